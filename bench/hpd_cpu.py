"""HPD forward + backward on the CPU: the library's torch backend against the reference, the way
the published recipe computes it (full float32 log-softmaxes of student and teacher, a float32
softmax for sampling y_hat), in one run, as ratios.

    python bench/hpd_cpu.py [--rows 4096] [--vocab 32000] [--repeats 3]

Peak memory: each variant runs in a fresh subprocess; its peak resident set size (ru_maxrss) minus
the resident size once the inputs exist is the memory the loss itself needed (gradient included).
Time: median of `--repeats` forward+backward calls after one warm-up, in that same subprocess.
A benchmark, not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("reference", "hpd_kernels_torch")


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant, rows, vocab, repeats):
    sys.path.insert(0, ROOT)
    import torch

    import hpd_kernels
    import reference

    torch.manual_seed(0)
    student = torch.randn(rows, vocab) * 2
    teacher = student + torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))

    def step():
        leaf = student.requires_grad_(True)
        if variant == "reference":
            sampled = torch.multinomial(torch.softmax(leaf.detach(), dim=-1), 1)[:, 0]
            loss = reference.hybrid_kl_loss(leaf, teacher, labels, sampled)
        else:
            loss = hpd_kernels.hybrid_kl_loss(leaf, teacher, labels, seed=0, backend="torch")
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    baseline = _rss_bytes()
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        grad = step()
        elapsed = time.perf_counter() - start
        del grad
        if index:
            times.append(elapsed)
    return {"peak_extra_bytes": _peak_rss_bytes() - baseline, "seconds": statistics.median(times), "times": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    if args.variant:  # child process: one variant, JSON on stdout
        print(json.dumps(run_variant(args.variant, args.rows, args.vocab, args.repeats)))
        return

    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, "--rows", str(args.rows),
                              "--vocab", str(args.vocab), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    ref, ours = results["reference"], results["hpd_kernels_torch"]
    record = {
        "benchmark": "HPD forward+backward, fp32, CPU",
        "rows": args.rows, "vocab": args.vocab, "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "results": results,
        "memory_ratio_reference_over_ours": ref["peak_extra_bytes"] / ours["peak_extra_bytes"],
        "time_ratio_reference_over_ours": ref["seconds"] / ours["seconds"],
    }
    gib = 2.0**30
    table = [
        f"HPD forward+backward, fp32, N={args.rows}, V={args.vocab}, {record['machine']}, {record['date']}",
        "",
        "| variant | peak extra memory (GiB) | time (s, median) |",
        "|---|---:|---:|",
        f"| reference (recipe: full fp32 log-softmaxes + softmax for sampling) | {ref['peak_extra_bytes'] / gib:.2f} | {ref['seconds']:.2f} |",
        f"| hpd_kernels, backend='torch' (chunked) | {ours['peak_extra_bytes'] / gib:.2f} | {ours['seconds']:.2f} |",
        f"| **ratio reference / ours** | **{record['memory_ratio_reference_over_ours']:.1f}x** | **{record['time_ratio_reference_over_ours']:.2f}x** |",
    ]
    text = "\n".join(table) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu_hpd_N{args.rows}_V{args.vocab}")
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
