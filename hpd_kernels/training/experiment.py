"""`hpd experiment`: every objective against HPD on the same teacher, data, optimiser and budget.

For each seed, the student is initialised and warmed up with `sft` once (that seed's "student
before"); every objective then continues from that same warm student, with the same `distill`
options (steps, batch size, learning rate and schedule, clipping, evaluation), only `objective`
differing. The seed also fixes the batches and the sampling noise of the distillation, so two
objectives at one seed see the same examples in the same order (a paired comparison).

A sensitivity sweep reruns HPD over a grid of `fkl_weight` x `rkl_weight`, and with
`on_policy_fraction` > 0 (full student rollouts) against the approximate on-policy default.

Each run lives in `<out>/runs/<name>/` (trainer checkpoints, metrics) and is marked finished by its
`summary.json`: an interrupted experiment resumes the unfinished runs from their checkpoints and
never redoes a finished one. The report (`results.md`, `results.json`, PNG plots) is rebuilt from
the summaries at the end of every invocation.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import time

import torch

from .checkpoint import load_model, save_model
from .pipeline import (
    DEFAULT_CONFIG,
    ConfigError,
    Workload,
    _claim_output_dir,
    _json_dump,
    _prepare_teacher,
    _train_config,
    build_model,
    choose_device,
    default_cache_dir,
    evaluate_model,
    merge_config,
    read_json_object,
    validate_config,
)
from .trainer import train

DEFAULT_EXPERIMENT = {
    "objectives": ["sft", "fkl", "rkl", "jsd", "skl", "hpd"],
    "seeds": [0, 1, 2],
    # Shared by every run; `objective` and `seed` are set per run.
    "distill": {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 200,
                "save_every": 250},
    "sweep": {"fkl_weight": [0.5, 1.0, 2.0], "rkl_weight": [0.5, 1.0, 2.0], "on_policy_fraction": [0.5],
              "seeds": [0, 1]},
    "eval": {"max_new_tokens": 48, "temperature": 1.0, "seed": 0, "samples": 4},
    # Everything else (task or data, teacher, student and its warm-up) comes from `hpd distill`'s
    # default config, overridable under "base".
    "base": {},
}

EXPERIMENT_KEYS = set(DEFAULT_EXPERIMENT) | {"device"}
SWEEP_KEYS = {"fkl_weight", "rkl_weight", "on_policy_fraction", "seeds"}
SPIKE_WINDOW, SPIKE_FACTOR = 50, 1.5


def load_experiment(path=None):
    """The default experiment, overridden key by key by the JSON file at `path`."""
    experiment = copy.deepcopy(DEFAULT_EXPERIMENT)
    if path is not None:
        user = read_json_object(path, "experiment file")
        for key, value in user.items():
            if key not in EXPERIMENT_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {sorted(EXPERIMENT_KEYS)}")
            if key in ("sweep", "eval", "distill") and isinstance(value, dict):
                experiment[key].update(value)
            else:
                experiment[key] = value
    source = path or "the default experiment"
    for key in experiment["sweep"]:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{source}: unknown key sweep.{key!r}; known keys: {sorted(SWEEP_KEYS)}")
    for key in ("objective", "seed"):
        if key in experiment["distill"]:
            raise ConfigError(f"{source}: distill.{key} is set per run (use 'objectives' and 'seeds')")
    if not experiment["objectives"] or not experiment["seeds"]:
        raise ConfigError(f"{source}: 'objectives' and 'seeds' must not be empty")
    if not isinstance(experiment["base"], dict):
        raise ConfigError(f"{source}: 'base' must be an object")
    base_dir = os.path.dirname(os.path.abspath(path)) if path is not None else os.getcwd()
    base = merge_config(DEFAULT_CONFIG, experiment["base"], base_dir, source, prefix="base.")
    base["eval"] = {key: value for key, value in experiment["eval"].items() if key != "samples"}
    base["distill"] = {}
    validate_config(base, source)
    for objective in experiment["objectives"]:
        _train_config({**experiment["distill"], "objective": objective}, f"{source}: distill")
    experiment["base"] = base
    return experiment


def planned_runs(experiment):
    """`[(name, group, seed, TrainConfig overrides)]`: the main grid, then the HPD sweep."""
    runs = []
    for objective in experiment["objectives"]:
        for seed in experiment["seeds"]:
            runs.append((f"{objective}-seed{seed}", objective, seed, {"objective": objective}))
    sweep = experiment["sweep"]
    for fkl_weight in sweep.get("fkl_weight", []):
        for rkl_weight in sweep.get("rkl_weight", []):
            if (fkl_weight, rkl_weight) == (1.0, 1.0) and "hpd" in experiment["objectives"]:
                continue  # the main grid's hpd
            group = f"hpd fkl={fkl_weight:g} rkl={rkl_weight:g}"
            for seed in sweep.get("seeds", experiment["seeds"]):
                runs.append((f"hpd-fkl{fkl_weight:g}-rkl{rkl_weight:g}-seed{seed}", group, seed,
                             {"objective": "hpd", "fkl_weight": fkl_weight, "rkl_weight": rkl_weight}))
    for fraction in sweep.get("on_policy_fraction", []):
        if fraction == 0:
            continue
        group = f"hpd on-policy={fraction:g}"
        for seed in sweep.get("seeds", experiment["seeds"]):
            runs.append((f"hpd-onpolicy{fraction:g}-seed{seed}", group, seed,
                         {"objective": "hpd", "on_policy_fraction": fraction}))
    return runs


def _spikes(values, factor):
    """Steps whose value exceeds `factor` x the median of the previous SPIKE_WINDOW steps."""
    return sum(1 for index in range(SPIKE_WINDOW, len(values))
               if values[index] > factor * statistics.median(values[index - SPIKE_WINDOW:index]))


def stability(history, max_grad_norm):
    """Stability of one run, in measures that mean the same for every objective:

    - `ce_spikes`: steps whose cross-entropy on the data tokens (positive, comparable across
      objectives) exceeds 1.5x the median of the previous 50 steps;
    - `grad_spikes`: steps whose gradient norm exceeds 3x the median of the previous 50;
    - `grad_norm_p95_over_median`: the spread of gradient norms, free of each objective's scale;
    - `loss_spikes`: the same rule on the training loss itself, kept for reference only: HPD's and
      the divergences' surrogate losses approach 0 (HPD's can be negative), where a ratio test is
      meaningless.
    """
    norms = [record["grad_norm"] for record in history]
    ordered = sorted(norms)
    median = statistics.median(ordered)
    return {"ce_spikes": _spikes([record["cross_entropy"] for record in history], SPIKE_FACTOR),
            "grad_spikes": _spikes(norms, 3.0),
            "loss_spikes": _spikes([record["loss"] for record in history], SPIKE_FACTOR),
            "grad_norm_mean": statistics.fmean(norms), "grad_norm_median": median, "grad_norm_max": ordered[-1],
            "grad_norm_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "grad_norm_p95_over_median": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] / median
            if median else None,
            "clipped_fraction": sum(norm > max_grad_norm for norm in norms) / len(norms) if max_grad_norm else 0.0}


def evaluate_with_samples(model, workload, eval_config, teacher, samples):
    """`evaluate_model`, with the sampled accuracy averaged over `samples` independent draws."""
    result = evaluate_model(model, workload, eval_config, teacher)
    if samples > 1:
        from .task import answer_accuracy

        draws = [result["sampled_accuracy"]] + [
            answer_accuracy(model, workload.eval_problems, workload.tokenizer, greedy=False,
                            temperature=eval_config["temperature"], max_new_tokens=eval_config["max_new_tokens"],
                            seed=eval_config["seed"] + draw, score=workload.score)
            for draw in range(1, samples)]
        result["sampled_accuracy"] = statistics.fmean(draws)
    return result


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("+uncommitted-changes" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_experiment(experiment, out_dir, *, cache_dir=None, log=print, only=None, workers=1):
    """Run (or resume) every planned run, then write the report; returns the report dict.
    `only` limits this invocation to the first `only` unfinished runs (a time-sliced job);
    `workers` > 1 runs that many runs at once in separate processes (one CPU thread each)."""
    base = experiment["base"]
    device = choose_device(experiment.get("device", "auto"))
    cache_dir = cache_dir or default_cache_dir()
    workload = Workload(base)
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", device)
    build_model(base["student"], workload.tokenizer, "student", device)  # checks the student before writing
    _claim_output_dir(out_dir, {key: value for key, value in experiment.items()})
    teacher, _ = _prepare_teacher(teacher, base, workload, cache_dir, log)
    samples = experiment["eval"].get("samples", 1)
    teacher_path = os.path.join(out_dir, "teacher_evaluation.json")
    if not os.path.isfile(teacher_path):
        _json_dump(teacher_path, evaluate_with_samples(teacher, workload, base["eval"], None, samples))
    common = dict(pad_id=workload.tokenizer.pad_id, eos_id=workload.tokenizer.eos_id, log=log)
    for seed in sorted({seed for _, _, seed, _ in planned_runs(experiment)}):  # warm-ups first, once each
        _warm_student(base, workload, seed, device, out_dir, teacher, samples, common)
    started = time.perf_counter()
    commit = _git_commit()  # the code this process imported, not whatever is checked out when a run ends
    pending = [run for run in planned_runs(experiment)
               if not os.path.isfile(os.path.join(out_dir, "runs", run[0], "summary.json"))]
    if only is not None:
        pending = pending[:only]
    if workers > 1 and len(pending) > 1:
        import multiprocessing

        # Rollout runs are the longest: start them first so that the workers finish together.
        pending.sort(key=lambda run: -run[3].get("on_policy_fraction", 0))
        jobs = [(experiment, out_dir, cache_dir, run, commit) for run in pending]
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_single_thread) as pool:
            for name in pool.imap_unordered(_run_in_worker, jobs):
                log(f"finished {name}")
    else:
        for run in pending:
            _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit)
    report = write_report(experiment, out_dir)
    report["seconds_this_invocation"] = time.perf_counter() - started
    return report




def _single_thread():
    torch.set_num_threads(1)


def _run_in_worker(job):
    """One run in a worker process: data, cached teacher and warm student rebuilt from disk."""
    experiment, out_dir, cache_dir, run, commit = job
    base = experiment["base"]
    device = choose_device(experiment.get("device", "auto"))
    workload = Workload(base)
    teacher = build_model(base["teacher"], workload.tokenizer, "teacher", device)
    teacher, _ = _prepare_teacher(teacher, base, workload, cache_dir, lambda *_: None)
    samples = experiment["eval"].get("samples", 1)
    common = dict(pad_id=workload.tokenizer.pad_id, eos_id=workload.tokenizer.eos_id, log=lambda *_: None)
    _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit, progress=False)
    return run[0]


def _execute(run, experiment, out_dir, workload, teacher, device, samples, common, commit, progress=True):
    """Train one run (resuming its checkpoint if any) and write its `summary.json`."""
    name, group, seed, overrides = run
    base = experiment["base"]
    run_dir = os.path.join(out_dir, "runs", name)
    student = _warm_student(base, workload, seed, device, out_dir, teacher, samples, common)
    config = _train_config({**experiment["distill"], **overrides, "seed": 1000 + seed}, f"run {name}")
    if not config.max_new_tokens:
        config.max_new_tokens = workload.max_response_tokens()
    common["log"](f"run {name}")
    run_started = time.perf_counter()
    history = train(config, student, teacher, workload.examples, run_dir=run_dir, label=name, progress=progress,
                    evaluate=lambda model, step: evaluate_with_samples(
                        model, workload, base["eval"], teacher, samples if step == config.steps else 1),
                    **common)
    final = {key.removeprefix("eval_"): value for key, value in history[-1].items() if key.startswith("eval_")}
    summary = {"name": name, "group": group, "seed": seed, "config": config.to_dict(), "final": final,
               "stability": stability(history, config.max_grad_norm),
               "efficiency": {"step_time_ms_mean": 1000 * statistics.fmean(r["step_time_s"] for r in history),
                              "train_seconds": sum(r["step_time_s"] for r in history),
                              "wall_seconds_this_invocation": time.perf_counter() - run_started,
                              "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
                              "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in history)},
               "threads": torch.get_num_threads(), "commit": commit}
    _json_dump(os.path.join(run_dir, "summary.json"), summary)


def _warm_student(base, workload, seed, device, out_dir, teacher, samples, common):
    """The student after its `sft` warm-up for `seed`, trained once and reused by every run."""
    folder = os.path.join(out_dir, f"warmup-seed{seed}")
    weights = os.path.join(folder, "student.safetensors")
    section = copy.deepcopy(base["student"])
    warmup = section.get("warmup")
    if warmup:
        section["warmup"] = {**warmup, "seed": seed}
    torch.manual_seed(seed)
    student = build_model({**section, "train": {"seed": seed}}, workload.tokenizer, "student", device)
    if os.path.isfile(weights):
        load_model(student, weights)
        return student
    if warmup:
        train(_train_config(section["warmup"], "student.warmup"), student, None, workload.examples,
              run_dir=os.path.join(folder, "run"), label=f"warm-up seed {seed}", **common)
    _json_dump(os.path.join(folder, "evaluation.json"),
               evaluate_with_samples(student, workload, base["eval"], teacher, samples))
    save_model(student, weights)
    return student


# ----------------------------------------------------------------------------------------------
# Report


def _mean_std(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _curves(run_dir, key, smooth=1):
    """`(steps, values)` of one metric in a run's metrics.jsonl, averaged over `smooth` steps."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        points = [(record["step"], record[key]) for record in map(json.loads, handle) if key in record]
    if smooth > 1:
        points = [(points[index + smooth - 1][0], statistics.fmean(value for _, value in points[index:index + smooth]))
                  for index in range(0, len(points) - smooth + 1, smooth)]
    return points


COLUMNS = (("greedy acc", ("final", "greedy_accuracy"), "{:.1%}"),
           ("sampled acc", ("final", "sampled_accuracy"), "{:.1%}"),
           ("FKL to teacher", ("final", "fkl_to_teacher"), "{:.3f}"),
           ("RKL to teacher", ("final", "rkl_to_teacher"), "{:.3f}"),
           ("held-out CE", ("final", "heldout_ce"), "{:.3f}"),
           ("final entropy", ("curve", "entropy"), "{:.3f}"),
           ("CE spikes", ("stability", "ce_spikes"), "{:.1f}"),
           ("grad spikes", ("stability", "grad_spikes"), "{:.1f}"),
           ("grad-norm p95/median", ("stability", "grad_norm_p95_over_median"), "{:.2f}"),
           ("step time (ms)", ("efficiency", "step_time_ms_mean"), "{:.1f}"),
           ("peak mem (MiB)", ("efficiency", "peak_memory_mb"), "{:.0f}"))


def write_report(experiment, out_dir):
    """Table (mean ± std over seeds), raw JSON and plots from the finished runs' summaries."""
    summaries, groups = [], {}
    for name, group, seed, _ in planned_runs(experiment):
        path = os.path.join(out_dir, "runs", name, "summary.json")
        if os.path.isfile(path):
            with open(path) as handle:
                summary = json.load(handle)
            run_dir = os.path.join(out_dir, "runs", name)
            with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
                history = [json.loads(line) for line in handle if line.strip()]
            # Recomputed from the metrics, so that a report always uses the current definitions.
            summary["stability"] = stability(history, summary["config"]["max_grad_norm"])
            tail = [record["entropy"] for record in history[-50:]]
            teacher_tail = [record["teacher_entropy"] for record in history[-50:] if "teacher_entropy" in record]
            summary["curve"] = {"entropy": statistics.fmean(tail) if tail else None,
                                "teacher_entropy": statistics.fmean(teacher_tail) if teacher_tail else None}
            # The curves behind the plots, small enough for the raw JSON: every evaluation, and the
            # training-batch entropies averaged over 50 steps.
            summary["curves"] = {
                "eval": [{key: value for key, value in record.items() if key == "step" or key.startswith("eval_")}
                         for record in history if any(key.startswith("eval_") for key in record)],
                "entropy_per_50_steps": [value for _, value in _curves(run_dir, "entropy", 50)],
                "teacher_entropy_per_50_steps": [value for _, value in _curves(run_dir, "teacher_entropy", 50)]}
            summaries.append(summary)
            groups.setdefault(group, []).append(summary)
    teacher = {}
    if os.path.isfile(os.path.join(out_dir, "teacher_evaluation.json")):
        with open(os.path.join(out_dir, "teacher_evaluation.json")) as handle:
            teacher = json.load(handle)
    befores = []
    for seed in sorted({summary["seed"] for summary in summaries}):
        path = os.path.join(out_dir, f"warmup-seed{seed}", "evaluation.json")
        if os.path.isfile(path):
            with open(path) as handle:
                befores.append(json.load(handle))
    table = {}
    for group, members in groups.items():
        row = {}
        for label, (section, key), _ in COLUMNS:
            row[label] = _mean_std([member[section].get(key) for member in members])
        row["seeds"] = len(members)
        table[group] = row
    lines = [f"| run | seeds | " + " | ".join(label for label, _, _ in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]

    def cell(mean_std, fmt):
        mean, std = mean_std
        if mean is None:
            return "-"
        if fmt.endswith("%}"):
            return f"{mean:.1%} ± {std:.1%}"
        return fmt.format(mean) + " ± " + fmt.format(std)

    teacher_cells = [f"{teacher[key]:.1%}" if key in teacher else "-" for key in ("greedy_accuracy", "sampled_accuracy")]
    teacher_entropy = [summary["curve"]["teacher_entropy"] for summary in summaries
                       if summary["curve"].get("teacher_entropy") is not None]
    entropy_cell = f"{statistics.fmean(teacher_entropy):.3f}" if teacher_entropy else "-"
    lines.append(f"| teacher | - | {teacher_cells[0]} | {teacher_cells[1]} | - | - | "
                 f"{teacher.get('heldout_ce', float('nan')):.3f} | {entropy_cell} |" + " - |" * (len(COLUMNS) - 6))
    if befores:
        before_row = {label: _mean_std([before.get(key) for before in befores])
                      for label, (section, key), _ in COLUMNS if section == "final"}
        lines.append(f"| student before (sft warm-up) | {len(befores)} | "
                     + " | ".join(cell(before_row[label], fmt) if label in before_row else "-"
                                  for label, _, fmt in COLUMNS) + " |")
    for group, row in table.items():
        lines.append(f"| {group} | {row['seeds']} | " + " | ".join(cell(row[label], fmt) for label, _, fmt in COLUMNS)
                     + " |")
    markdown = "\n".join(lines)
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write(markdown + "\n")
    report = {"experiment": {key: value for key, value in experiment.items() if key != "base"},
              "base": experiment["base"], "teacher": teacher, "student_before": befores,
              "table": {group: {label: list(value) if isinstance(value, tuple) else value
                                for label, value in row.items()} for group, row in table.items()},
              "runs": summaries, "planned": len(planned_runs(experiment)), "finished": len(summaries),
              "commits": sorted({summary.get("commit") or "unknown" for summary in summaries})}
    _json_dump(os.path.join(out_dir, "results.json"), report)
    plot_experiment(experiment, out_dir, groups, teacher)
    report["markdown"] = markdown
    return report


def plot_experiment(experiment, out_dir, groups, teacher):
    """accuracy.png and entropy.png: one line per objective (mean over seeds) with a min-max band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    main_groups = [group for group in groups if group in experiment["objectives"]]
    sweep_groups = [group for group in groups if group not in experiment["objectives"]]
    panels = (("accuracy.png", (("eval_greedy_accuracy", "greedy accuracy"),
                                ("eval_sampled_accuracy", "sampled accuracy (mean over draws)")), 1),
              ("entropy.png", (("entropy", "student entropy on training batches (nats/token)"),
                               ("eval_rkl_to_teacher", "reverse KL to the teacher, held out")), 50))
    for filename, metrics, smooth in panels:
        figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for axis, (key, title) in zip(axes, metrics):
            for group in main_groups + sweep_groups:
                curves = [_curves(os.path.join(out_dir, "runs", member["name"]), key, smooth if key == "entropy" else 1)
                          for member in groups[group]]
                length = min(len(curve) for curve in curves)
                if not length:
                    continue
                steps = [step for step, _ in curves[0][:length]]
                values = [[curve[index][1] for curve in curves] for index in range(length)]
                mean = [statistics.fmean(column) for column in values]
                style = "-" if group in main_groups else ":"
                line, = axis.plot(steps, mean, style, label=f"{group} (n={len(curves)})",
                                  marker="o" if length < 30 else None, markersize=3)
                axis.fill_between(steps, [min(column) for column in values], [max(column) for column in values],
                                  color=line.get_color(), alpha=0.15)
            if key == "entropy":
                teacher_curve = [_curves(os.path.join(out_dir, "runs", member["name"]), "teacher_entropy", smooth)
                                 for group in main_groups for member in groups[group] if group != "sft"][:1]
                if teacher_curve and teacher_curve[0]:
                    axis.plot(*zip(*teacher_curve[0]), "k--", label="teacher")
            if key == "eval_greedy_accuracy" and "greedy_accuracy" in teacher:
                axis.axhline(teacher["greedy_accuracy"], color="k", linestyle="--", label="teacher")
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=6)
        figure.suptitle("hpd experiment: mean over seeds, band = min to max")
        figure.tight_layout()
        figure.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(figure)
