"""`hpd experiment`'s report, rebuilt from the finished runs on disk: the table of every group of
runs (mean ± std over seeds), the pre-registered primary comparison and the paired secondary ones
(mean difference over seeds with its 95% t-interval), the learning-rate tuning and the efficiency
measures in `results.md`; the raw numbers and curves in `results.json`; the accuracy and entropy
plots.

A column of the table is one `Column` in `COLUMNS`: its label, where a run's summary holds the
value, and its format. The teacher's row reads its evaluation as `final` and its entropy on the
training batches as `curve.entropy`; the student-before row reads the warm-up evaluations as
`final`. A column that a row has no value for shows "-".
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from .jsonfiles import read_metrics, write_json_atomic, write_text_atomic, writing
from .schema import ACCURACIES

SPIKE_WINDOW, SPIKE_FACTOR = 50, 1.5


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
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"ce_spikes": _spikes([record["cross_entropy"] for record in history], SPIKE_FACTOR),
            "grad_spikes": _spikes(norms, 3.0),
            "loss_spikes": _spikes([record["loss"] for record in history], SPIKE_FACTOR),
            "grad_norm_mean": statistics.fmean(norms), "grad_norm_median": median, "grad_norm_max": ordered[-1],
            "grad_norm_p95": p95, "grad_norm_p95_over_median": p95 / median if median else None,
            "clipped_fraction": sum(norm > max_grad_norm for norm in norms) / len(norms) if max_grad_norm else 0.0}


def _mean_std(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _curve(history, key, smooth=1):
    """`(steps, values)` of one metric in a run's records, averaged over `smooth` steps."""
    points = [(record["step"], record[key]) for record in history if key in record]
    if smooth > 1:
        points = [(points[index + smooth - 1][0], statistics.fmean(value for _, value in points[index:index + smooth]))
                  for index in range(0, len(points) - smooth + 1, smooth)]
    return points


def _run_metrics(out_dir, name):
    return read_metrics(os.path.join(out_dir, "runs", name, "metrics.jsonl"))


@dataclass(frozen=True)
class Column:
    """A column of the report: a run's value is `summary[section][key]`, shown with `fmt`."""

    label: str
    section: str
    key: str
    fmt: str

    def value(self, summary):
        return summary.get(self.section, {}).get(self.key)


COLUMNS = (Column("top-p acc", "final", "top_p_accuracy", "{:.1%}"),
           Column("T=1 acc", "final", "sampled_accuracy", "{:.1%}"),
           Column("greedy acc", "final", "greedy_accuracy", "{:.1%}"),
           Column("FKL to teacher", "final", "fkl_to_teacher", "{:.3f}"),
           Column("RKL to teacher", "final", "rkl_to_teacher", "{:.3f}"),
           Column("held-out CE", "final", "heldout_ce", "{:.3f}"),
           Column("final entropy", "curve", "entropy", "{:.3f}"),
           Column("CE spikes", "stability", "ce_spikes", "{:.1f}"),
           Column("grad spikes", "stability", "grad_spikes", "{:.1f}"),
           Column("grad-norm p95/median", "stability", "grad_norm_p95_over_median", "{:.2f}"),
           Column("clipped steps", "stability", "clipped_fraction", "{:.0%}"),
           Column("step time (ms)", "efficiency", "step_time_ms_mean", "{:.1f}"))


def group_statistics(members):
    """`{column label: (mean, std)}` over the summaries `members` (one per seed)."""
    return {column.label: _mean_std([column.value(member) for member in members]) for column in COLUMNS}


def _line(cells):
    return "| " + " | ".join(cells) + " |"


def _mean_std_cells(statistics_by_label):
    cells = []
    for column in COLUMNS:
        mean, std = statistics_by_label[column.label]
        cells.append("-" if mean is None else column.fmt.format(mean) + " ± " + column.fmt.format(std))
    return cells


def results_markdown(teacher, befores, groups):
    """The table of `results.md`: the teacher (its evaluation `teacher`), the student before
    distillation (the warm-up evaluations `befores`), then each group of run summaries."""
    teacher_entropy = [summary["curve"]["teacher_entropy"] for members in groups.values() for summary in members
                       if summary["curve"].get("teacher_entropy") is not None]
    teacher_summary = {"final": teacher,
                       "curve": {"entropy": statistics.fmean(teacher_entropy) if teacher_entropy else None}}
    teacher_cells = []
    for column in COLUMNS:
        value = column.value(teacher_summary)
        teacher_cells.append("-" if value is None else column.fmt.format(value))
    lines = [_line(["run", "seeds"] + [column.label for column in COLUMNS]),
             "|---|---:|" + "---:|" * len(COLUMNS),
             _line(["teacher", "-"] + teacher_cells)]
    if befores:
        before_statistics = group_statistics([{"final": before} for before in befores])
        lines.append(_line(["student before (sft warm-up on gold)", str(len(befores))] + _mean_std_cells(before_statistics)))
    for group, members in groups.items():
        lines.append(_line([group, str(len(members))] + _mean_std_cells(group_statistics(members))))
    return "\n".join(lines)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the Cornish-Fisher
# expansion about the normal quantile (within 1e-3 of the exact value there).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)


def t_quantile_975(degrees):
    if degrees <= len(T_975):
        return T_975[degrees - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


def paired_difference(treatment, control):
    """The mean of the paired differences `treatment - control` (one per seed), its 95% t-interval
    (None with fewer than two pairs) and how many pairs favour the treatment."""
    differences = [a - b for a, b in zip(treatment, control)]
    mean = statistics.fmean(differences)
    half = (t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
            if len(differences) > 1 else None)
    return {"differences": differences, "mean": mean, "ci95": None if half is None else [mean - half, mean + half],
            "treatment_better": sum(difference > 0 for difference in differences), "pairs": len(differences)}


def _paired(groups, treatment, control, metric):
    """`paired_difference` of `metric` between two groups, over the seeds both finished."""
    by_seed = {group: {member["seed"]: member["final"].get(metric) for member in groups.get(group, [])}
               for group in (treatment, control)}
    seeds = sorted(seed for seed in by_seed[treatment] if seed in by_seed[control]
                   and by_seed[treatment][seed] is not None and by_seed[control][seed] is not None)
    if not seeds:
        return None
    return {"seeds": seeds, **paired_difference([by_seed[treatment][seed] for seed in seeds],
                                                [by_seed[control][seed] for seed in seeds])}


def area_under_curve(points):
    """The trapezoidal mean of a curve `[(step, value)]` over its steps (its value if one point)."""
    if len(points) == 1:
        return points[0][1]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def summary_path(out_dir, name):
    """Where a run of an experiment writes its summary: it is finished once this exists."""
    return os.path.join(out_dir, "runs", name, "summary.json")


def _read_summary(out_dir, name, metric, start=None):
    """A finished run's summary, with what the report derives from its metrics (recomputed, so that
    a report always uses the current definitions), or None for a run not finished. `start` is the
    warm student's value of `metric`, the curve's point at step 0."""
    path = summary_path(out_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    history = _run_metrics(out_dir, name)
    summary["stability"] = stability(history, summary["config"]["max_grad_norm"])
    tail = [record["entropy"] for record in history[-50:]]
    teacher_tail = [record["teacher_entropy"] for record in history[-50:] if "teacher_entropy" in record]
    curve = ([(0, start)] if start is not None else []) + _curve(history, f"eval_{metric}")
    summary["curve"] = {"entropy": statistics.fmean(tail) if tail else None,
                        "teacher_entropy": statistics.fmean(teacher_tail) if teacher_tail else None,
                        "primary": curve, "auc": area_under_curve(curve) if curve else None}
    # The curves behind the plots, small enough for the raw JSON: every evaluation, and the
    # training-batch entropies averaged over 50 steps.
    summary["curves"] = {
        "eval": [{key: value for key, value in record.items() if key == "step" or key.startswith("eval_")}
                 for record in history if any(key.startswith("eval_") for key in record)],
        "entropy_per_50_steps": [value for _, value in _curve(history, "entropy", 50)],
        "teacher_entropy_per_50_steps": [value for _, value in _curve(history, "teacher_entropy", 50)]}
    return summary


def _read_json(path, default):
    if not os.path.isfile(path):
        return default
    with open(path) as handle:
        return json.load(handle)


def _percent(value):
    return f"{100 * value:+.1f}"


def analysis(experiment, groups, baseline="seqkd"):
    """The comparisons of the report, from the main runs' groups: the pre-registered primary one,
    the treatment against every other arm on each metric (secondary), and the efficiency measures
    (area under the primary metric's curve; steps until each run first reaches the baseline's final
    mean, when the baseline ran)."""
    primary = experiment["primary"]
    metric, treatment = primary["metric"], primary["treatment"]
    result = {"primary": {**primary, "result": _paired(groups, treatment, primary["control"], metric)},
              "secondary": {}, "efficiency": {}}
    for group in groups:
        if group != treatment:
            result["secondary"][group] = {name: _paired(groups, treatment, group, name)
                                          for name in ACCURACIES}
    target = None
    if groups.get(baseline):
        target = statistics.fmean(member["final"][metric] for member in groups[baseline])
    for group, members in groups.items():
        reached = []
        for member in members:
            steps = [step for step, value in member["curve"]["primary"] if target is not None and value >= target]
            reached.append(steps[0] if steps else None)
        result["efficiency"][group] = {
            "auc": _mean_std([member["curve"]["auc"] for member in members]),
            "steps_to_baseline": reached, "baseline_final": target}
    return result


def analysis_markdown(experiment, result, selection):
    """The primary comparison, the secondary ones, the tuning and the efficiency, as Markdown."""
    primary = result["primary"]
    lines = [f"Primary (pre-registered): {primary['metric']}, paired {primary['treatment']} - {primary['control']} "
             f"over seeds, mean and 95% t-interval, in points."]
    outcome = primary["result"]
    if outcome:
        interval = ("-" if outcome["ci95"] is None else
                    f"[{_percent(outcome['ci95'][0])}, {_percent(outcome['ci95'][1])}]")
        lines += ["", "| comparison | seeds | per-seed differences | mean | 95% CI | seeds favouring treatment |",
                  "|---|---:|---|---:|---:|---:|",
                  f"| {primary['treatment']} - {primary['control']} | {outcome['pairs']} | "
                  f"{', '.join(_percent(value) for value in outcome['differences'])} | {_percent(outcome['mean'])} | "
                  f"{interval} | {outcome['treatment_better']}/{outcome['pairs']} |"]
    if result["secondary"]:
        lines += ["", f"Secondary (not corrected for multiplicity): {primary['treatment']} - each arm, paired by "
                  f"seed, mean [95% CI] in points.", "", "| arm | top-p acc | T=1 acc | greedy acc |", "|---|---|---|---|"]
        for group, metrics in result["secondary"].items():
            cells = []
            for name in ACCURACIES:
                outcome = metrics[name]
                if outcome is None:
                    cells.append("-")
                elif outcome["ci95"] is None:
                    cells.append(_percent(outcome["mean"]))
                else:
                    cells.append(f"{_percent(outcome['mean'])} [{_percent(outcome['ci95'][0])}, "
                                 f"{_percent(outcome['ci95'][1])}]")
            lines.append(_line([group] + cells))
    if selection:
        rates = sorted({rate for entry in selection.values() for rate in entry["validation"]}, key=float)
        lines += ["", f"Learning rate per arm: {primary['metric']} on the validation split at the tuning seed "
                  f"(selected in bold).", "", _line(["arm"] + [f"lr {rate}" for rate in rates]),
                  "|---|" + "---:|" * len(rates)]
        for group, entry in selection.items():
            cells = []
            for rate in rates:
                value = entry["validation"].get(rate)
                text = "-" if value is None else f"{value:.1%}"
                cells.append(f"**{text}**" if value is not None and float(rate) == entry["lr"] else text)
            lines.append(_line([group] + cells))
    efficiency = result["efficiency"]
    if efficiency:
        target = next(iter(efficiency.values()))["baseline_final"]
        reach = ("steps to the baseline's final " + (f"({target:.1%})" if target is not None else "(no baseline)"))
        lines += ["", f"Efficiency: area under the {primary['metric']} curve (mean over the evaluations, the warm "
                  f"student at step 0), and the first evaluation step at which each seed reaches the baseline's "
                  f"final mean.", "", _line(["arm", "AUC", reach]), "|---|---:|---|"]
        for group, entry in efficiency.items():
            mean, std = entry["auc"]
            steps = "-" if target is None else ", ".join("never" if step is None else str(step)
                                                         for step in entry["steps_to_baseline"])
            lines.append(_line([group, "-" if mean is None else f"{mean:.1%} ± {std:.1%}", steps]))
    return "\n".join(lines)


def write_report(experiment, runs, out_dir, selection=None):
    """Table (mean ± std over seeds), comparisons, raw JSON and plots from the summaries of the
    finished runs among `runs` (the experiment's tuning and main runs, in their order); `selection`
    is the learning-rate tuning's outcome."""
    metric = experiment["primary"]["metric"]
    teacher = _read_json(os.path.join(out_dir, "teacher_evaluation.json"), {})
    warm = {}
    for seed in sorted({run.seed for run in runs}):
        evaluation = _read_json(os.path.join(out_dir, f"warmup-seed{seed}", "evaluation.json"), None)
        if evaluation is not None:
            warm[seed] = evaluation
    summaries, tuning, groups = [], [], {}
    for run in runs:
        start = warm.get(run.seed, {}).get("validation" if run.tuning else "test", {}).get(metric)
        summary = _read_summary(out_dir, run.name, metric, start)
        if summary is None:
            continue
        if run.tuning:
            tuning.append(summary)
        else:
            summaries.append(summary)
            groups.setdefault(run.group, []).append(summary)
    befores = [warm[seed]["test"] for seed in sorted(warm) if seed in experiment["seeds"]]
    result = analysis(experiment, groups)
    markdown = results_markdown(teacher, befores, groups) + "\n\n" + analysis_markdown(experiment, result, selection)
    write_text_atomic(os.path.join(out_dir, "results.md"), markdown + "\n")
    table = {group: {**{label: list(value) for label, value in group_statistics(members).items()},
                     "seeds": len(members)} for group, members in groups.items()}
    report = {"experiment": {key: value for key, value in experiment.items() if key != "base"},
              "base": experiment["base"], "teacher": teacher, "teacher_data": _read_json(
                  os.path.join(out_dir, "teacher_data.json"), None),
              "student_before": befores, "table": table, "analysis": result, "lr_selection": selection,
              "runs": summaries, "tuning_runs": tuning, "planned": len(runs), "finished": len(summaries) + len(tuning),
              "commits": sorted({summary.get("commit") or "unknown" for summary in summaries + tuning})}
    write_json_atomic(os.path.join(out_dir, "results.json"), report)
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
    sweep_groups = [group for group in groups if group.startswith("hpd ")]  # the HPD sweep's arms
    main_groups = [group for group in groups if group not in sweep_groups]
    top_p = experiment["eval"].get("top_p")
    panels = (("accuracy.png", (("eval_top_p_accuracy", f"top-p {top_p} accuracy (T=1)"),
                                ("eval_greedy_accuracy", "greedy accuracy")), 1),
              ("entropy.png", (("entropy", "student entropy on training batches (nats/token)"),
                               ("eval_rkl_to_teacher", "reverse KL to the teacher, held out")), 50))
    for filename, metrics, smooth in panels:
        figure, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for axis, (key, title) in zip(axes, metrics):
            for group in main_groups + sweep_groups:
                curves = [_curve(_run_metrics(out_dir, member["name"]), key, smooth if key == "entropy" else 1)
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
                teacher_curve = [_curve(_run_metrics(out_dir, member["name"]), "teacher_entropy", smooth)
                                 for group in main_groups for member in groups[group]
                                 if member["config"]["objective"] != "sft"][:1]
                if teacher_curve and teacher_curve[0]:
                    axis.plot(*zip(*teacher_curve[0]), "k--", label="teacher")
            if key.startswith("eval_") and key.removeprefix("eval_") in teacher:
                axis.axhline(teacher[key.removeprefix("eval_")], color="k", linestyle="--", label="teacher")
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=6)
        figure.suptitle("hpd experiment: mean over seeds, band = min to max")
        figure.tight_layout()
        with writing(os.path.join(out_dir, filename)):
            figure.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(figure)
