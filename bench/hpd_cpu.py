"""HPD forward + backward on the CPU: the library's torch backend against the reference, the way
the published recipe computes it (full float32 log-softmaxes of student and teacher, a float32
softmax for sampling y_hat), in one run, as ratios.

    python bench/hpd_cpu.py [--rows 4096] [--vocab 32000] [--repeats 3]            # from logits
    python bench/hpd_cpu.py --fused [--student-hidden 256] [--teacher-hidden 512]  # from hidden states

With `--fused` both sides start from hidden states and lm_head weights: the reference computes the
student's and teacher's logits naively (float32 GEMMs, then the recipe), the library calls
`fused_linear_hybrid_kl_loss`, so the logits exist only a chunk at a time.

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
FUSED_VARIANTS = ("reference_from_hidden", "hpd_kernels_fused_linear")


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant, rows, vocab, repeats, student_hidden_size=256, teacher_hidden_size=512):
    sys.path.insert(0, ROOT)
    import torch

    import hpd_kernels
    from hpd_kernels import reference

    torch.manual_seed(0)
    labels = torch.randint(0, vocab, (rows,))

    def recipe(student_logits, teacher_logits):
        sampled = torch.multinomial(torch.softmax(student_logits.detach(), dim=-1), 1)[:, 0]
        return reference.hybrid_kl_loss(student_logits, teacher_logits, labels, sampled)

    if variant in FUSED_VARIANTS:
        # Weights scaled like a trained lm_head: logits of order a few units.
        student_hidden = torch.randn(rows, student_hidden_size)
        student_weight = (torch.randn(vocab, student_hidden_size) * 2 / student_hidden_size**0.5).requires_grad_(True)
        teacher_hidden = torch.randn(rows, teacher_hidden_size)
        teacher_weight = torch.randn(vocab, teacher_hidden_size) * 2 / teacher_hidden_size**0.5
        leaves = (student_hidden.requires_grad_(True), student_weight)

        def step():
            if variant == "reference_from_hidden":
                loss = recipe(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)
            else:
                loss = hpd_kernels.fused_linear_hybrid_kl_loss(student_hidden, student_weight, teacher_hidden,
                                                               teacher_weight, labels, seed=0, backend="torch")
            return torch.autograd.grad(loss, leaves)
    else:
        student = (torch.randn(rows, vocab) * 2).requires_grad_(True)
        teacher = student.detach() + torch.randn(rows, vocab)

        def step():
            if variant == "reference":
                loss = recipe(student, teacher)
            else:
                loss = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=0, backend="torch")
            return torch.autograd.grad(loss, student)

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
    parser.add_argument("--fused", action="store_true", help="start from hidden states and lm_head weights")
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--variant", choices=VARIANTS + FUSED_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    if args.variant:  # child process: one variant, JSON on stdout
        print(json.dumps(run_variant(args.variant, args.rows, args.vocab, args.repeats, args.student_hidden,
                                     args.teacher_hidden)))
        return

    variants = FUSED_VARIANTS if args.fused else VARIANTS
    results = {}
    for variant in variants:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, "--rows", str(args.rows),
                              "--vocab", str(args.vocab), "--repeats", str(args.repeats),
                              "--student-hidden", str(args.student_hidden), "--teacher-hidden", str(args.teacher_hidden)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    ref, ours = results[variants[0]], results[variants[1]]
    shape = (f"N={args.rows}, H_student={args.student_hidden}, H_teacher={args.teacher_hidden}, V={args.vocab}"
             if args.fused else f"N={args.rows}, V={args.vocab}")
    labels = ({"ref": "reference from hidden states (naive fp32 logits, then the recipe)",
               "ours": "hpd_kernels.fused_linear_hybrid_kl_loss, backend='torch'"} if args.fused else
              {"ref": "reference (recipe: full fp32 log-softmaxes + softmax for sampling)",
               "ours": "hpd_kernels.hybrid_kl_loss, backend='torch' (chunked)"})
    record = {
        "benchmark": f"HPD forward+backward, fp32, CPU, {'fused-linear' if args.fused else 'from logits'}",
        "shape": shape,
        "rows": args.rows, "vocab": args.vocab, "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "results": results,
        "memory_ratio_reference_over_ours": ref["peak_extra_bytes"] / ours["peak_extra_bytes"],
        "time_ratio_reference_over_ours": ref["seconds"] / ours["seconds"],
    }
    gib = 2.0**30
    table = [
        f"HPD forward+backward, fp32, {shape}, {record['machine']}, {record['date']}",
        "",
        "| variant | peak extra memory (GiB) | time (s, median) |",
        "|---|---:|---:|",
        f"| {labels['ref']} | {ref['peak_extra_bytes'] / gib:.3f} | {ref['seconds']:.2f} |",
        f"| {labels['ours']} | {ours['peak_extra_bytes'] / gib:.3f} | {ours['seconds']:.2f} |",
        f"| **ratio reference / ours** | **{record['memory_ratio_reference_over_ours']:.1f}x** | **{record['time_ratio_reference_over_ours']:.2f}x** |",
    ]
    text = "\n".join(table) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu_hpd{'_fused_linear' if args.fused else ''}_N{args.rows}_V{args.vocab}")
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
