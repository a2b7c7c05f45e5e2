"""`python -m bench`: peak memory and time, forward + backward, of every objective, side by side.

For each objective and token count it measures, in one run: the reference (the recipe's full
float32 log-softmaxes), the reference under torch.compile, hpd_kernels, and from hidden states
the naive lm_head + reference against hpd_kernels' fused-linear losses; on CUDA also
Liger-Kernel's LigerJSD / LigerFusedLinearJSD for JSD when liger_kernel is installed. It prints a
markdown table of ratios to the library, and writes `bench_{device}_{dtype}_V{vocab}.{json,md,png}`
to `--out`.

    python -m bench                       # CPU defaults (about 10 minutes on 2 cores) or CUDA defaults
    python -m bench --quick               # a smoke run on tiny shapes (results go to a temp folder)
    python -m bench --device cuda --tokens 2048 8192 --objectives hpd jsd

The JSON and markdown are rewritten after every measurement, so a run stopped by a time limit keeps
all it measured. A benchmark, not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import torch

from bench import measure, report, workloads

HERE = os.path.dirname(os.path.abspath(__file__))
# The CPU may be shared: before each measurement wait (up to QUIET_WAIT_S) until other processes
# use under measure.CONTENDED_CORES; a measurement during which they used more is run again (at
# most RETRIES more times, waiting for quiet first) and the least disturbed attempt is kept.
# --quick does neither: a smoke run's times mean nothing, and it should take a minute, not many.
RETRIES = 2
QUIET_WAIT_S = 60

DEFAULTS = {
    # A 2-core CPU runs the reference at 0.7-3.5 s per 1k tokens x 32k vocabulary per objective,
    # the fused-linear cases add their matmuls and torch.compile ~10 s per measurement: these
    # shapes keep the whole default run near 10 minutes there. 320 rows, not 256: a [256, 32000]
    # float32 tensor (31.25 MiB) is under glibc's 32 MiB mmap threshold, so freed ones stay in
    # malloc's heap and the peak RSS would measure the allocator's reuse rather than the loss.
    "cpu": dict(tokens=[320, 640, 1280], vocab=32000, dtype="float32", student_hidden=256,
                teacher_hidden=512, repeats=3, warmup=1),
    # A Qwen-size vocabulary and 4k hidden states in bf16, as in LLM distillation.
    "cuda": dict(tokens=[2048, 4096, 8192, 16384], vocab=151936, dtype="bfloat16", student_hidden=4096,
                 teacher_hidden=4096, repeats=10, warmup=2),
}
QUICK = dict(tokens=[128, 256], vocab=4096, student_hidden=64, teacher_hidden=128, repeats=1, warmup=1,
             objectives=["hpd", "jsd"], retries=0, quiet_wait_s=0)


def _prompt_fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults per device: " + json.dumps(DEFAULTS))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--objectives", nargs="+", choices=workloads.BENCHMARKED_OBJECTIVES, help="default: all")
    parser.add_argument("--tokens", nargs="+", type=int, help="rows of logits per step")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--hidden", nargs=2, type=int, metavar=("STUDENT", "TEACHER"),
                        help="hidden sizes of the fused-linear cases")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, at least (more when calls are "
                        "short, for about 1 s of timing); the median is reported")
    parser.add_argument("--warmup", type=int, help="untimed calls first (torch.compile gets one more)")
    parser.add_argument("--variants", nargs="+", choices=list(workloads.VARIANTS), help="default: all that apply")
    parser.add_argument("--compile-objectives", nargs="+", choices=workloads.BENCHMARKED_OBJECTIVES,
                        help="objectives that get the torch.compile variant (default: all; compiling takes "
                             "10-60 s per objective)")
    parser.add_argument("--out", help="output folder (default bench/results; with --quick a temporary folder)")
    parser.add_argument("--retries", type=int, help=f"CPU: runs again of a disturbed measurement (default {RETRIES})")
    parser.add_argument("--quiet-wait", type=float,
                        help=f"CPU: seconds to wait for other processes to quieten before each measurement "
                             f"(default {QUIET_WAIT_S})")
    parser.add_argument("--prompt-fraction", type=_prompt_fraction, default=workloads.PROMPT_FRACTION,
                        help="share of rows outside the loss (prompt tokens), in [0, 1) (default 1/8; 0: every "
                        "row in the loss, where the library has no prompt rows to skip)")
    parser.add_argument("--note", help="a line for the results (e.g. that the machine was shared)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, HPD and JSD, no waiting for "
                        "a quiet CPU: a smoke run")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: redraw the table and plot of a "
                        "results JSON (written next to it)")
    return parser.parse_args(argv)


def resolve_settings(args) -> dict:
    device = measure.resolve_device(args.device)
    settings = dict(DEFAULTS[device], retries=RETRIES, quiet_wait_s=QUIET_WAIT_S)
    if args.quick:
        settings.update(QUICK)
    given = dict(tokens=args.tokens, vocab=args.vocab, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                 objectives=args.objectives, retries=args.retries, quiet_wait_s=args.quiet_wait)
    settings.update({key: value for key, value in given.items() if value is not None})
    if args.hidden:
        settings["student_hidden"], settings["teacher_hidden"] = args.hidden
    settings.setdefault("objectives", list(workloads.BENCHMARKED_OBJECTIVES))
    settings["tokens"] = sorted(set(settings["tokens"]))
    settings["prompt_fraction"] = args.prompt_fraction
    settings["device"] = device
    settings["variants"] = args.variants or list(workloads.VARIANTS)
    settings["compile_objectives"] = args.compile_objectives or list(settings["objectives"])
    settings["memory_method"] = (
        "torch.cuda.max_memory_allocated() during the timed repeats minus the bytes allocated before them."
        if device == "cuda" else
        "each measurement in a fresh process; peak RSS (VmHWM, as ru_maxrss) minus the RSS once the inputs exist "
        "(malloc_trim, then the high-water mark reset there; for torch.compile and hpd_kernels, whose torch "
        "backend compiles its chunk math, after the warm-up, so that compiling is not counted).")
    if args.note:
        settings["note"] = args.note
    if args.out:
        settings["out"] = args.out
    elif args.quick:
        settings["out"] = os.path.join(tempfile.gettempdir(), "hpd_bench_quick")
    else:
        settings["out"] = os.path.join(HERE, "results")
    return settings


def plan(settings):
    """The measurements to run, in order, and the (variant, objective) pairs left out with why."""
    jobs, skipped = [], []
    for objective in settings["objectives"]:
        for variant in settings["variants"]:
            reason = workloads.applicable(variant, objective, settings["device"])
            if reason is None and variant == workloads.COMPILED and objective not in settings["compile_objectives"]:
                reason = "not in --compile-objectives"
            if reason is not None:
                if not (variant in workloads.LIGER_VARIANTS and objective != "jsd"):  # obvious, not worth a line
                    skipped.append(f"{variant} for {objective}: {reason}")
                continue
            for tokens in settings["tokens"]:
                jobs.append(measure.Job(
                    variant=variant, objective=objective, tokens=tokens, vocab=settings["vocab"],
                    student_hidden=settings["student_hidden"], teacher_hidden=settings["teacher_hidden"],
                    dtype=settings["dtype"], device=settings["device"],
                    warmup=settings["warmup"] + (1 if variant == workloads.COMPILED else 0),
                    repeats=settings["repeats"], prompt_fraction=settings["prompt_fraction"]))
    # Run objective by objective, token count by token count, every variant side by side; torch.compile
    # last of each group: its compile (10-60 s) is what most likely runs past a time limit, and the
    # measurements before it are written by then.
    order = {name: index for index, name in enumerate(workloads.VARIANTS)}
    order[workloads.COMPILED] = len(order)
    jobs.sort(key=lambda job: (settings["objectives"].index(job.objective), job.tokens, order[job.variant]))
    return jobs, skipped


def _others_load(result):
    return result.get("other_cpu_load") or 0.0


def _run_when_quiet(runner, job, quiet_wait_s):
    if quiet_wait_s > 0:
        load = measure.wait_for_quiet_cpu(quiet_wait_s, measure.CONTENDED_CORES)
        if load >= measure.CONTENDED_CORES:
            print(f"  other processes keep {load:.2f} cores busy; measuring anyway", flush=True)
    return runner.run(job)


def measure_on_cpu(runner, job, retries, quiet_wait_s):
    """One CPU measurement in a fresh process, retried while other processes disturbed it."""
    result, attempts = _run_when_quiet(runner, job, quiet_wait_s), 1
    while attempts <= retries and _others_load(result) > measure.CONTENDED_CORES:
        print(f"  other processes used {_others_load(result):.2f} cores meanwhile: measuring again", flush=True)
        retry = _run_when_quiet(runner, job, quiet_wait_s)
        attempts += 1
        if "error" not in retry and _others_load(retry) < _others_load(result):
            result = retry
    result["attempts"] = attempts
    return result


def write_outputs(record, settings, final):
    os.makedirs(settings["out"], exist_ok=True)
    base = os.path.join(settings["out"], report.stem(settings))
    report.add_ratios(record["results"])
    with open(base + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    text = report.markdown(record)
    with open(base + ".md", "w") as handle:
        handle.write(text)
    if final:
        try:
            report.plot(record, base + ".png")
        except ImportError as error:  # matplotlib is the optional `bench` extra
            print(f"no plot: {error} (pip install -e '.[bench]')", file=sys.stderr)
    return base, text


def render(json_path):
    with open(json_path) as handle:
        record = json.load(handle)
    base = os.path.splitext(json_path)[0]
    report.add_ratios(record["results"])
    with open(base + ".md", "w") as handle:
        handle.write(report.markdown(record))
    report.plot(record, base + ".png")
    print(f"wrote {base}.md, {base}.png")


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    settings = resolve_settings(args)
    jobs, skipped = plan(settings)
    machine = report.describe_machine(settings["device"])
    record = {
        "title": f"hpd_kernels benchmark: {settings['device']}, {settings['dtype']}, V={settings['vocab']}",
        "command": " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "date": report.now_iso(),
        "machine": machine,
        "settings": {key: value for key, value in settings.items() if key != "out"},
        "variants": {name: variant.description for name, variant in workloads.VARIANTS.items()},
        "skipped": skipped,
        "results": [],
    }
    print(f"{len(jobs)} measurements on {report.machine_line(machine)}", flush=True)
    for item in skipped:
        print(f"  not run: {item}", flush=True)

    runner = measure.FreshProcessRunner() if settings["device"] == "cpu" else None
    started = time.perf_counter()
    for index, job in enumerate(jobs, 1):
        result = (measure_on_cpu(runner, job, settings["retries"], settings["quiet_wait_s"]) if runner
                  else measure.measure_cuda(job))
        record["results"].append({"objective": job.objective, "tokens": job.tokens, "variant": job.variant, **result})
        summary = (f"error: {result['error']}" if "error" in result else
                   f"{result['peak_bytes'] / report.MIB:8.0f} MiB {result['seconds'] * 1e3:9.1f} ms"
                   + (f"  (others' CPU {result['other_cpu_load']:.2f})" if result.get("other_cpu_load") else ""))
        print(f"[{index:3d}/{len(jobs)} {time.perf_counter() - started:6.0f}s] {job.objective:<16} "
              f"{job.tokens:>6} {job.variant:<26} {summary}", flush=True)
        write_outputs(record, settings, final=False)  # partial outputs survive an interrupted or timed-out run
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    base, text = write_outputs(record, settings, final=True)
    print()
    print(text)
    print(f"wrote {base}.json, {base}.md, {base}.png ({record['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
