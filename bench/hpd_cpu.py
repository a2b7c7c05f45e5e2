"""HPD forward + backward on the CPU: the library's torch backend against the reference, the way
the published recipe computes it (full float32 log-softmaxes of student and teacher, a float32
softmax for sampling y_hat), in one run, as ratios.

    python bench/hpd_cpu.py [--rows 4096] [--vocab 32000] [--repeats 3]            # from logits
    python bench/hpd_cpu.py --fused [--student-hidden 256] [--teacher-hidden 512]  # from hidden states

With `--fused` both sides start from hidden states and lm_head weights: the reference computes the
student's and teacher's logits naively (float32 GEMMs, then the recipe), the library calls
`fused_linear_hybrid_kl_loss`, so the logits exist only a chunk at a time. A third variant, "lean
naive", is the least work a plain PyTorch HPD does: the two GEMMs, both log-softmaxes and HPD's four
gathers with the `y_hat` the library drew (given as `sampled_ids` to both, so neither samples).

Peak memory: each variant runs in a fresh subprocess; its peak resident set size (ru_maxrss) minus
the resident size once the inputs exist is the memory the loss itself needed (gradient included).
Time: the first call of that fresh process (cold: it pays one-time costs), and the median of
`--repeats` forward+backward calls in that same subprocess once it is in its steady state (warm:
for the library, after its torch backend's eager phase and the call that compiles its chunk math).
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
import tempfile
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("reference", "hpd_kernels_torch")
FUSED_VARIANTS = ("reference_from_hidden", "lean_naive", "hpd_kernels_fused_linear")


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def lean_hpd(log_q, log_p, labels, sampled_ids):
    """HPD from the two log-softmaxes with the least work: four gathers and per-row arithmetic
    (every label in range here; the mean over all rows)."""
    import torch

    def at(log_probs, ids):
        return log_probs.gather(1, ids[:, None])[:, 0]

    log_q_y, log_q_hat = at(log_q, labels), at(log_q, sampled_ids)
    log_p_y, log_p_hat = at(log_p, labels), at(log_p, sampled_ids)
    with torch.no_grad():
        q_y, q_hat = log_q_y.exp(), log_q_hat.exp()
        d_y, d_hat = q_y * (log_p_y - log_q_y), q_hat * (log_p_hat - log_q_hat)
        over = d_hat < 0
        w_y = d_y + torch.where(d_y > 0, log_p_y.exp() * torch.where(over, 2.0, 1.0), 0.0)
        w_hat = torch.where(over & (sampled_ids != labels), d_hat, 0.0)
    return -(w_y * log_q_y + w_hat * log_q_hat).mean()


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

        # y_hat given to both the lean naive path and the library, so neither samples in the timed calls.
        given = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))

        def step():
            if variant == "reference_from_hidden":
                loss = recipe(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)
            elif variant == "lean_naive":
                log_q = torch.log_softmax(student_hidden @ student_weight.T, dim=-1)
                with torch.no_grad():
                    log_p = torch.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
                loss = lean_hpd(log_q, log_p, labels, given)
            else:
                loss = hpd_kernels.fused_linear_hybrid_kl_loss(student_hidden, student_weight, teacher_hidden,
                                                               teacher_weight, labels, sampled_ids=given,
                                                               backend="torch")
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
    start = time.perf_counter()
    step()
    cold = time.perf_counter() - start
    untimed_calls, untimed_seconds = 1, cold
    if variant in ("hpd_kernels_torch", "hpd_kernels_fused_linear"):
        # The torch backend's eager phase and the call that compiles: warm means its steady state.
        from bench.measure import through_eager_phase

        calls, seconds = through_eager_phase(step)
        untimed_calls, untimed_seconds = untimed_calls + calls, untimed_seconds + seconds
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_extra_bytes": _peak_rss_bytes() - baseline, "seconds": statistics.median(times), "times": times,
            "cold_seconds": cold, "untimed_calls": untimed_calls, "untimed_seconds": untimed_seconds}


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
    parser.add_argument("--note", default="", help="a line for the results (e.g. that the machine was shared)")
    args = parser.parse_args(argv)

    if args.variant:  # child process: one variant, JSON on stdout
        print(json.dumps(run_variant(args.variant, args.rows, args.vocab, args.repeats, args.student_hidden,
                                     args.teacher_hidden)))
        return

    variants = FUSED_VARIANTS if args.fused else VARIANTS
    results = {}

    def run(variant, env=None):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, "--rows", str(args.rows),
                              "--vocab", str(args.vocab), "--repeats", str(args.repeats),
                              "--student-hidden", str(args.student_hidden), "--teacher-hidden", str(args.teacher_hidden)],
                             capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    for variant in variants:
        results[variant] = run(variant)
    # The library once more with an empty inductor cache: the first call of the very first run, which
    # compiles from scratch (the runs above find the compiled chunk math in the on-disk cache).
    with tempfile.TemporaryDirectory() as cache:
        empty_cache = run(variants[-1], dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache))

    import torch

    ours_name = variants[-1]
    ours = results[ours_name]
    shape = (f"N={args.rows}, H_student={args.student_hidden}, H_teacher={args.teacher_hidden}, V={args.vocab}"
             if args.fused else f"N={args.rows}, V={args.vocab}")
    labels = ({"reference_from_hidden": "reference from hidden states (naive fp32 logits, then the recipe)",
               "lean_naive": "lean naive (two GEMMs, two log_softmax, HPD's four gathers; y_hat given)",
               "hpd_kernels_fused_linear": "hpd_kernels.fused_linear_hybrid_kl_loss, backend='torch' (y_hat given)"}
              if args.fused else
              {"reference": "reference (recipe: full fp32 log-softmaxes + softmax for sampling)",
               "hpd_kernels_torch": "hpd_kernels.hybrid_kl_loss, backend='torch' (chunked)"})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    record = {
        "benchmark": f"HPD forward+backward, fp32, CPU, {'fused-linear' if args.fused else 'from logits'}",
        "shape": shape,
        "rows": args.rows, "vocab": args.vocab, "date": date.today().isoformat(),
        "machine": machine, "note": args.note,
        "results": results,
        "ours_empty_compile_cache": empty_cache,
        "ratios_over_ours": {name: {"memory": results[name]["peak_extra_bytes"] / ours["peak_extra_bytes"],
                                    "warm": results[name]["seconds"] / ours["seconds"],
                                    "cold": results[name]["cold_seconds"] / ours["cold_seconds"]}
                             for name in variants[:-1]},
    }
    gib = 2.0**30
    table = [
        f"HPD forward+backward, fp32, {shape}, {machine}, {record['date']}",
        "",
        "Each variant in a fresh process: cold = its first call (one-time costs included; the library's torch "
        "backend runs its first calls eagerly and compiles its chunk math after a few seconds of work, "
        "from scratch or from inductor's on-disk cache), warm = median of "
        f"{args.repeats} calls in the steady state (for ours: after its eager phase and the call that "
        "compiles, which `untimed` counts with the first call). Ratios: against ours without the "
        "empty-cache row.",
        "",
    ]
    if args.note:
        table += [args.note, ""]
    table += ["| variant | peak extra memory (GiB) | cold (s) | warm (s, median) | untimed calls (s) |",
              "|---|---:|---:|---:|---:|"]

    def untimed(result):
        return f"{result['untimed_calls']} ({result['untimed_seconds']:.1f})"

    for name in variants:
        result = results[name]
        table.append(f"| {labels[name]} | {result['peak_extra_bytes'] / gib:.3f} | {result['cold_seconds']:.2f} | "
                     f"{result['seconds']:.2f} | {untimed(result)} |")
    table.append(f"| {labels[ours_name]}, empty compile cache | {empty_cache['peak_extra_bytes'] / gib:.3f} | "
                 f"{empty_cache['cold_seconds']:.2f} | {empty_cache['seconds']:.2f} | {untimed(empty_cache)} |")
    for name, ratio in record["ratios_over_ours"].items():
        table.append(f"| **ratio {name} / ours** | **{ratio['memory']:.1f}x** | **{ratio['cold']:.2f}x** | "
                     f"**{ratio['warm']:.2f}x** | |")
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
