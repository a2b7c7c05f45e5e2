"""`python -m bench.trl_compare`: our fused-linear forward KL, JSD (beta = 0.5) and reverse KL against
TRL's `ChunkedDivergenceFunction` (trl.kernels.chunked_divergence), side by side in one run.

Both start from hidden states and lm_head weights (no bias, temperature 1, no logit scale or soft
cap), every row in the loss, and reduce to the mean over rows; each step is forward + backward, the
gradients of the student's hidden states and weight kept alive to its end (as `bench.workloads`
does). TRL's side is `ChunkedDivergenceFunction.apply(...)[0].mean()` with its `beta`: 0 forward KL,
0.5 JSD, 1 reverse KL; the same convention as our `fused_linear_jsd_loss(beta=...)`, which the
correctness check below confirms. TRL also returns the student's entropy (no gradient); ours does
not compute it.

On the CPU this is TRL's torch path against our torch backend; on CUDA (`--device cuda`, the GPU
check) both Triton paths.

    python -m bench.trl_compare                       # N=4096, H_s=256, H_t=512, V=32000, float32
    python -m bench.trl_compare --quick               # tiny shapes, a smoke run (results to a temp folder)
    python -m bench.trl_compare --device cuda --out DIR

Before timing, each objective's loss and gradients are compared, ours against TRL's, on the first
rows of the benchmark's own inputs (an AssertionError stops the run), and so are the losses of the
timed runs afterwards (the `loss rel. diff` column).

CPU, as `bench/measure.py` measures: every measurement in a fresh process forked from a server
that imported torch, hpd_kernels and trl. Cold = that process's first call (one-time costs
included; our torch backend runs its first calls eagerly and compiles its chunk math later, from
inductor's on-disk cache, or from scratch in the `empty compile cache` run). Warm = the median of
the timed calls in the steady state (for ours: after its eager phase and the call that compiles).
Peak memory = peak RSS during the timed calls minus the RSS before them (malloc_trim, then the
high-water mark reset there), for both. Before each measurement it waits for other processes to
quieten; one disturbed during its cold call or its timed calls is run again, and one still
disturbed is flagged.

CUDA: one process. Cold = the first call of that (variant, objective) in the process (Triton's
JIT compiles included, as far as Triton's on-disk cache does not hold them; kernels shared between
objectives are compiled for the first one). Warm = median of the timed calls. Peak memory =
`torch.cuda.max_memory_allocated()` during the timed calls minus the bytes allocated before them.

A benchmark, not a test: nothing asserts a time or a memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict

import torch

from bench import measure, report, workloads

HERE = os.path.dirname(os.path.abspath(__file__))
TRL = "trl ChunkedDivergenceFunction"
OURS = "hpd_kernels fused-linear"
OURS_EMPTY_CACHE = "hpd_kernels fused-linear, empty compile cache"
# TRL's beta for each of our objectives (0: forward KL, 1: reverse KL, between: the generalized JSD).
OBJECTIVES = {"forward_kl": 0.0, "jsd": workloads.JSD_BETA, "reverse_kl": 1.0}
DEFAULTS = dict(tokens=4096, vocab=32000, student_hidden=256, teacher_hidden=512, dtype="float32", repeats=3,
                warmup=1)
# 128 x 4096 logits: under the torch backend's compile size (COMPILE_MIN_ELEMENTS), so ours stays eager
QUICK = dict(tokens=128, vocab=4096, student_hidden=64, teacher_hidden=128, repeats=1, warmup=1)
CHECK_ROWS = 256       # rows of the benchmark's inputs that the correctness check runs
RETRIES = 2
QUIET_WAIT_S = 60
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}   # relative (gradients: to their largest entry)
GPU_TOLERANCE_FLOAT32 = 2e-3    # on CUDA both sides' fp32 GEMMs may differ in order (and TF32 settings)


# A measurement: `bench.measure`'s, every row in the loss (prompt_fraction 0).
Job = measure.Job


# ----------------------------------------------------------------------------------------------
# The two losses.
# ----------------------------------------------------------------------------------------------

def make_inputs(tokens, vocab, student_hidden, teacher_hidden, dtype, device, seed=0):
    """`bench.workloads`' hidden-state inputs, every row in the loss."""
    shape = workloads.Shape(tokens, vocab, student_hidden, teacher_hidden, getattr(torch, dtype), device,
                            prompt_fraction=0.0)
    return workloads.make_inputs("hidden", shape, seed=seed)


def trl_loss(beta, student_hidden, student_weight, teacher_hidden, teacher_weight):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    divergence, _entropy = ChunkedDivergenceFunction.apply(student_hidden, student_weight, None, teacher_hidden,
                                                           teacher_weight, None, beta, 1.0, 1.0, None, 1.0, None)
    return divergence.mean()


def ours_loss(objective, student_hidden, student_weight, teacher_hidden, teacher_weight, beta=None):
    import hpd_kernels

    args = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    if objective == "forward_kl":
        return hpd_kernels.fused_linear_forward_kl_loss(*args)
    if objective == "reverse_kl":
        return hpd_kernels.fused_linear_reverse_kl_loss(*args)
    return hpd_kernels.fused_linear_jsd_loss(*args, beta=OBJECTIVES["jsd"] if beta is None else beta)


def loss_function(variant, objective, inputs):
    args = (inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"])
    if variant == TRL:
        return lambda: trl_loss(OBJECTIVES[objective], *args)
    return lambda: ours_loss(objective, *args)


def build_step(variant, objective, inputs):
    """Forward + backward; the gradients of the student's hidden states and weight live to the end."""
    return workloads.gradient_step(loss_function(variant, objective, inputs),
                                   (inputs["student_hidden"], inputs["student_weight"]))


# ----------------------------------------------------------------------------------------------
# Correctness: the same number from both, before anything is timed.
# ----------------------------------------------------------------------------------------------

def _loss_and_grads(compute, leaves):
    loss = compute()
    return (loss.detach().double(), *(grad.double() for grad in torch.autograd.grad(loss, leaves)))


def _compare(what, got, expected, tolerance):
    """Largest relative difference of the loss and of each gradient (to its largest entry); asserts."""
    names = ("loss", "grad student_hidden", "grad student_weight")
    worst = {}
    for name, a, b in zip(names, got, expected):
        scale = max(float(b.abs().max()), 1e-12)
        difference = float((a - b).abs().max()) / scale
        worst[name] = difference
        assert difference <= tolerance, (f"{what}: {name} differs by {difference:.3g} (relative; tolerance "
                                         f"{tolerance:g}): {float(a.abs().max()):.6g} vs {float(b.abs().max()):.6g}")
    return worst


def check_same_numbers(settings) -> dict:
    """Each objective, ours against TRL on the first CHECK_ROWS rows of the benchmark's inputs; and that
    beta means the same in both: our JSD at beta 0 and 1 is our forward and reverse KL."""
    inputs = make_inputs(settings["tokens"], settings["vocab"], settings["student_hidden"], settings["teacher_hidden"],
                         settings["dtype"], settings["device"])
    rows = min(settings["tokens"], CHECK_ROWS)
    student_hidden = inputs["student_hidden"].detach()[:rows].clone().requires_grad_(True)
    student_weight = inputs["student_weight"]
    teacher = (inputs["teacher_hidden"][:rows], inputs["teacher_weight"])
    leaves = (student_hidden, student_weight)
    tolerance = TOLERANCE[settings["dtype"]]
    if settings["device"] == "cuda" and settings["dtype"] == "float32":
        tolerance = max(tolerance, GPU_TOLERANCE_FLOAT32)
    checks = {"rows": rows, "tolerance": tolerance}
    for objective, beta in OBJECTIVES.items():
        ours = _loss_and_grads(lambda: ours_loss(objective, student_hidden, student_weight, *teacher), leaves)
        theirs = _loss_and_grads(lambda: trl_loss(beta, student_hidden, student_weight, *teacher), leaves)
        checks[objective] = _compare(f"{objective}: ours vs TRL (beta={beta})", ours, theirs, tolerance)
        checks[objective]["loss"] = {"ours": float(ours[0]), "trl": float(theirs[0]),
                                     "relative": checks[objective]["loss"]}
        if objective != "jsd":  # the convention: JSD's beta 0 / 1 are forward / reverse KL, as TRL's beta
            as_jsd = _loss_and_grads(lambda: ours_loss("jsd", student_hidden, student_weight, *teacher, beta=beta),
                                     leaves)
            checks[f"jsd beta={beta:g} vs {objective}"] = _compare(f"our jsd(beta={beta:g}) vs our {objective}",
                                                                   as_jsd, ours, tolerance)
    return checks


# ----------------------------------------------------------------------------------------------
# One measurement.
# ----------------------------------------------------------------------------------------------

def measure_cpu_here(job: Job) -> dict:
    """In a fresh process (see the module docstring); the peak is that of the timed calls, for both."""
    torch.manual_seed(0)
    inputs = make_inputs(job.tokens, job.vocab, job.student_hidden, job.teacher_hidden, job.dtype, job.device)
    step = build_step(job.variant, job.objective, inputs)
    ours = job.variant != TRL
    cold_load = measure.OtherProcessesLoad()
    first_call_seconds, last_warmup_seconds, warmup_seconds = measure._warm_up(step, job.warmup, lambda: None)
    cold_load = cold_load.cores()
    eager_calls, eager_seconds = measure.through_eager_phase(step) if ours else (0, 0.0)
    measure.release_free_memory()
    baseline = measure.rss_bytes()
    peak_was_reset = measure.reset_peak_rss()
    other_load = measure.OtherProcessesLoad()
    times, loss = measure._timed(step, measure._repeats(job, last_warmup_seconds), lambda: None)
    peak = measure.peak_rss_bytes() - baseline
    warm_load = other_load.cores()
    # The cold call is a number of the table too: a disturbance during it counts (and is retried) like one
    # during the timed calls; `other_cpu_load` is the larger of the two.
    loads = [load for load in (cold_load, warm_load) if load is not None]
    return {"peak_bytes": peak, "seconds": statistics.median(times), "times": times, "loss": float(loss),
            "first_call_seconds": first_call_seconds, "peak_reset": peak_was_reset,
            "untimed_calls": job.warmup + eager_calls, "untimed_seconds": warmup_seconds + eager_seconds,
            "other_cpu_load": max(loads) if loads else None, "other_cpu_load_cold": cold_load,
            "other_cpu_load_warm": warm_load}


def measure_cuda_here(job: Job) -> dict:
    inputs = step = None
    synchronize = torch.cuda.synchronize
    try:
        torch.manual_seed(0)
        inputs = make_inputs(job.tokens, job.vocab, job.student_hidden, job.teacher_hidden, job.dtype, job.device)
        step = build_step(job.variant, job.objective, inputs)
        first_call_seconds, last_warmup_seconds, warmup_seconds = measure._warm_up(step, job.warmup, synchronize)
        gc.collect()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times, loss = measure._timed(step, measure._repeats(job, last_warmup_seconds), synchronize)
        peak = torch.cuda.max_memory_allocated() - baseline
        return {"peak_bytes": peak, "seconds": statistics.median(times), "times": times, "loss": float(loss),
                "first_call_seconds": first_call_seconds, "untimed_calls": job.warmup,
                "untimed_seconds": warmup_seconds}
    except torch.cuda.OutOfMemoryError as error:
        return {"error": "out of memory: " + measure._short_error(error)[:200]}
    except Exception as error:
        return {"error": measure._short_error(error), "traceback": traceback.format_exc(limit=4)}
    finally:
        del inputs, step
        gc.collect()
        torch.cuda.empty_cache()


def _child_main(job_fields: dict, empty_compile_cache: bool, connection):
    try:
        if empty_compile_cache:  # inductor reads it when it first needs its cache, after the fork
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpd_trl_compare_inductor_")
        result = measure_cpu_here(Job(**job_fields))
    except BaseException as error:  # report anything rather than die silently
        result = {"error": measure._short_error(error), "traceback": traceback.format_exc(limit=4)}
    connection.send(result)
    connection.close()


class FreshProcessRunner(measure.FreshProcessRunner):
    """`bench.measure`'s runner (a forkserver that has imported torch and hpd_kernels), with trl preloaded too
    and this module's measurement; `run((job, empty_compile_cache))`, as `bench.__main__.measure_on_cpu` calls it."""

    def __init__(self):
        super().__init__()
        self.context.set_forkserver_preload(["torch", "hpd_kernels", "hpd_kernels.reference", "bench.workloads",
                                             "bench.measure", "trl.kernels.chunked_divergence"])

    def run(self, task) -> dict:
        job, empty_compile_cache = task
        from bench import trl_compare  # by its importable name: under `-m`, this module is __main__

        return self.run_child(trl_compare._child_main, asdict(job), empty_compile_cache)


# ----------------------------------------------------------------------------------------------
# The run and its outputs.
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.trl_compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults: " + json.dumps(DEFAULTS) + "; --quick: " + json.dumps(QUICK))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="cpu (default): both torch paths; cuda: both Triton paths; auto: cuda when visible")
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", nargs=2, type=int, metavar=("STUDENT", "TEACHER"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, help="timed calls, at least (more when calls are short)")
    parser.add_argument("--warmup", type=int, help="untimed calls first; the first of them is the cold call")
    parser.add_argument("--retries", type=int, help=f"CPU: runs again of a disturbed measurement (default {RETRIES})")
    parser.add_argument("--quiet-wait", type=float, help=f"CPU: seconds to wait for other processes to quieten "
                        f"before each measurement (default {QUIET_WAIT_S})")
    parser.add_argument("--no-empty-cache", action="store_true",
                        help="CPU: skip the run of ours with an empty inductor cache (compiling from scratch)")
    parser.add_argument("--out", help="output folder (default bench/results/trl; with --quick a temporary folder)")
    parser.add_argument("--note", help="a line for the results")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat, no waiting for a quiet CPU, "
                        "no empty-cache run: a smoke run")
    return parser.parse_args(argv)


def resolve_settings(args) -> dict:
    device = measure.resolve_device(args.device)
    settings = dict(DEFAULTS, retries=RETRIES, quiet_wait_s=QUIET_WAIT_S, empty_cache=device == "cpu")
    if args.quick:
        settings.update(QUICK, retries=0, quiet_wait_s=0, empty_cache=False)
    given = dict(tokens=args.tokens, vocab=args.vocab, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                 retries=args.retries, quiet_wait_s=args.quiet_wait)
    settings.update({key: value for key, value in given.items() if value is not None})
    if args.hidden:
        settings["student_hidden"], settings["teacher_hidden"] = args.hidden
    if args.no_empty_cache:
        settings["empty_cache"] = False
    settings["warmup"] = max(1, settings["warmup"])  # the first untimed call is the cold one
    settings.update(device=device, objectives=list(args.objectives), quick=args.quick)
    if args.note:
        settings["note"] = args.note
    settings["out"] = args.out or (os.path.join(tempfile.gettempdir(), "hpd_bench_trl_quick") if args.quick
                                   else os.path.join(HERE, "results", "trl"))
    return settings


def plan(settings):
    """(job, empty_compile_cache) in order: per objective TRL, ours, then ours compiling from scratch."""
    tasks = []
    for objective in settings["objectives"]:
        variants = [(TRL, False), (OURS, False)] + ([(OURS, True)] if settings["empty_cache"] else [])
        for variant, empty in variants:
            tasks.append((Job(prompt_fraction=0.0, variant=variant, objective=objective, tokens=settings["tokens"], vocab=settings["vocab"],
                              student_hidden=settings["student_hidden"], teacher_hidden=settings["teacher_hidden"],
                              dtype=settings["dtype"], device=settings["device"], warmup=settings["warmup"],
                              repeats=settings["repeats"]), empty))
    return tasks


def _ok(result):
    return result is not None and "error" not in result


def summarize(record) -> list:
    """One row per objective: TRL and ours side by side, and ours / TRL."""
    rows = []
    by_key = {(r["objective"], r["variant"]): r for r in record["results"]}
    for objective in record["settings"]["objectives"]:
        trl, ours = by_key.get((objective, TRL)), by_key.get((objective, OURS))
        scratch = by_key.get((objective, OURS_EMPTY_CACHE))
        row = {"objective": objective, "beta": OBJECTIVES[objective]}
        if _ok(trl) and _ok(ours):
            row.update(memory_ratio=ours["peak_bytes"] / max(trl["peak_bytes"], 1),
                       warm_ratio=ours["seconds"] / trl["seconds"],
                       cold_ratio=ours["first_call_seconds"] / trl["first_call_seconds"],
                       loss_relative_difference=abs(ours["loss"] - trl["loss"]) / max(abs(trl["loss"]), 1e-12))
            if _ok(scratch):
                row["cold_empty_cache_ratio"] = scratch["first_call_seconds"] / trl["first_call_seconds"]
        rows.append(row)
    return rows


def _contended(result):
    return (result.get("other_cpu_load") or 0.0) > measure.CONTENDED_CORES


def markdown(record) -> str:
    settings = record["settings"]
    on_cpu = settings["device"] == "cpu"
    mib = report.MIB
    by_key = {(r["objective"], r["variant"]): r for r in record["results"]}
    paths = "torch paths (TRL's `_stats_tile`/`_jsd_tile`/`_backward_tile`, our torch backend)" if on_cpu else \
        "Triton paths"
    lines = [
        f"# {record['title']}",
        "",
        f"Machine: {report.machine_line(record['machine'])}; trl {record['machine'].get('trl')}. "
        f"Date: {record['date']}. hpd_kernels commit: {record['machine'].get('hpd_kernels_commit')}.",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Forward + backward (gradients of the student's hidden states and weight), {settings['dtype']}, "
        f"N = {settings['tokens']}, H_s = {settings['student_hidden']}, H_t = {settings['teacher_hidden']}, "
        f"V = {settings['vocab']}, every row in the loss, mean over rows; both {paths}. TRL: "
        "`ChunkedDivergenceFunction.apply(...)[0].mean()` with beta 0 / 0.5 / 1; ours: "
        "`fused_linear_forward_kl_loss` / `fused_linear_jsd_loss(beta=0.5)` / `fused_linear_reverse_kl_loss`.",
        "",
        ("Each measurement in a fresh process. Cold: its first call (ours runs its first calls eagerly and "
         "compiles its chunk math later; `empty cache`: the same with an empty inductor cache). Warm: median of "
         "the timed calls in the steady state (ours: after its eager phase and the call that compiles). Peak: "
         "peak RSS during the timed calls minus the RSS before them." if on_cpu else
         "One process. Cold: the first call of that (variant, objective) in it (Triton JIT compiles included "
         "unless Triton's cache held them). Warm: median of the timed calls. Peak: "
         "torch.cuda.max_memory_allocated() during the timed calls minus the bytes allocated before them."),
        *(["", settings["note"]] if settings.get("note") else []),
        "",
        "Ratios are ours / TRL, measured in this one run: below 1x means ours needs less memory or time.",
        "",
        "| objective | peak MiB, TRL | peak MiB, ours | memory ours/TRL | cold s, TRL | cold s, ours | cold ours/TRL "
        "| warm s, TRL | warm s, ours | warm ours/TRL | loss rel. diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(value):
        return "—" if value is None else f"**{value:.2f}x**"

    for row in record["summary"]:
        trl, ours = by_key.get((row["objective"], TRL), {}), by_key.get((row["objective"], OURS), {})

        def cell(result, key, scale=1.0, digits=2):
            return f"{result[key] / scale:.{digits}f}" if _ok(result) and key in result else "error"

        difference = row.get("loss_relative_difference")
        lines.append(
            f"| {row['objective']} (beta {row['beta']:g}) | {cell(trl, 'peak_bytes', mib, 0)} | "
            f"{cell(ours, 'peak_bytes', mib, 0)} | {ratio(row.get('memory_ratio'))} | "
            f"{cell(trl, 'first_call_seconds')} | {cell(ours, 'first_call_seconds')} | {ratio(row.get('cold_ratio'))} | "
            f"{cell(trl, 'seconds', digits=3)} | {cell(ours, 'seconds', digits=3)} | {ratio(row.get('warm_ratio'))} | "
            f"{'—' if difference is None else f'{difference:.1e}'} |")

    lines += ["", "All measurements:", "",
              "| objective | variant | peak MiB | cold s | warm s (median) | timed calls | untimed calls (s) |"
              + (" others' CPU (cores) | attempts |" if on_cpu else ""),
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_cpu else "")]
    notes = []
    for result in record["results"]:
        if _ok(result):
            cells = (f"{result['peak_bytes'] / mib:.0f} | {result['first_call_seconds']:.2f} | "
                     f"{result['seconds']:.3f} | {len(result['times'])} | "
                     f"{result['untimed_calls']} ({result['untimed_seconds']:.1f})")
        else:
            notes.append(f"{result['objective']}, {result['variant']}: {result['error']}")
            cells = f"error [{len(notes)}] | — | — | — | —"
        load = result.get("other_cpu_load")
        extra = (f" {'—' if load is None else f'{load:.2f}'} | {result.get('attempts', 1)} |" if on_cpu else "")
        lines.append(f"| {result['objective']} | {result['variant']} | {cells} |{extra}")
    if on_cpu:
        contended = [r for r in record["results"] if _contended(r)]
        lines += ["", f"`others' CPU`: cores that other processes kept busy during the cold call or the timed calls, "
                  f"the larger (a measurement "
                  f"above {measure.CONTENDED_CORES} is retried{'' if settings['retries'] else ' — not in this run'}, "
                  "the least disturbed attempt kept)."]
        if contended:
            lines += ["", f"**{len(contended)} of {len(record['results'])} measurements ran while other processes "
                      f"kept more than {measure.CONTENDED_CORES} cores busy: their times are not trustworthy.**"]
    check = record.get("correctness")
    if check:
        worst = max(value for objective in OBJECTIVES if objective in check
                    for name, value in check[objective].items() if name != "loss")
        lines += ["", f"Correctness, before timing: on the first {check['rows']} rows, each objective's loss and "
                  f"gradients, ours against TRL, agree to {worst:.1e} (relative; tolerance {check['tolerance']:g}); "
                  "our JSD at beta 0 and 1 is our forward and reverse KL, as TRL's beta."]
    if notes:
        lines += ["", "Errors:", ""] + [f"{index}. {note}" for index, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write_outputs(record, settings):
    os.makedirs(settings["out"], exist_ok=True)
    record["summary"] = summarize(record)
    base = os.path.join(settings["out"], f"trl_{settings['device']}_{settings['dtype']}_N{settings['tokens']}"
                                         f"_V{settings['vocab']}")
    with open(base + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    text = markdown(record)
    with open(base + ".md", "w") as handle:
        handle.write(text)
    return base, text


def _run_cpu(runner, task, settings):
    from bench.__main__ import measure_on_cpu

    return measure_on_cpu(runner, task, settings["retries"], settings["quiet_wait_s"])


def main(argv=None):
    args = parse_args(argv)
    settings = resolve_settings(args)
    machine = report.describe_machine(settings["device"])
    machine["trl"] = report._version("trl")
    record = {
        "title": (f"hpd_kernels fused-linear vs TRL ChunkedDivergenceFunction: {settings['device']}, "
                  f"{settings['dtype']}, N={settings['tokens']}, V={settings['vocab']}"),
        "command": " ".join(["python -m bench.trl_compare", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "date": report.now_iso(),
        "machine": machine,
        "settings": {key: value for key, value in settings.items() if key != "out"},
        "results": [],
    }
    print(f"{report.machine_line(machine)}; trl {machine['trl']}", flush=True)
    started = time.perf_counter()
    record["correctness"] = check_same_numbers(settings)
    print(f"correctness: ours and TRL agree on {record['correctness']['rows']} rows "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    tasks = plan(settings)
    runner = FreshProcessRunner() if settings["device"] == "cpu" else None
    for index, task in enumerate(tasks, 1):
        job, empty = task
        if runner:
            result = _run_cpu(runner, task, settings)
        else:
            result = measure_cuda_here(job)
        variant = OURS_EMPTY_CACHE if empty else job.variant
        record["results"].append({"objective": job.objective, "variant": variant, **result})
        summary = (f"error: {result['error']}" if "error" in result else
                   f"{result['peak_bytes'] / report.MIB:8.0f} MiB  cold {result['first_call_seconds']:7.2f} s  "
                   f"warm {result['seconds']:7.3f} s"
                   + (f"  (others' CPU {result['other_cpu_load']:.2f})" if result.get("other_cpu_load") else ""))
        print(f"[{index}/{len(tasks)} {time.perf_counter() - started:5.0f}s] {job.objective:<11} {variant:<46} "
              f"{summary}", flush=True)
        write_outputs(record, settings)  # partial outputs survive an interrupted run
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    record["contended"] = any(_contended(r) for r in record["results"])
    base, text = write_outputs(record, settings)
    print()
    print(text)
    print(f"wrote {base}.json, {base}.md ({record['total_seconds']:.0f} s)"
          + ("; CONTENDED: other processes disturbed some measurements" if record["contended"] else ""))
    failed = [r for r in record["results"] if not _ok(r)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
