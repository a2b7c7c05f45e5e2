"""`hpd experiment`'s report, rebuilt from the finished runs on disk: the table of every group of
runs (mean ± std over seeds) in `results.md`, the raw numbers and curves in `results.json`, and
the accuracy and entropy plots.

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


COLUMNS = (Column("greedy acc", "final", "greedy_accuracy", "{:.1%}"),
           Column("sampled acc", "final", "sampled_accuracy", "{:.1%}"),
           Column("FKL to teacher", "final", "fkl_to_teacher", "{:.3f}"),
           Column("RKL to teacher", "final", "rkl_to_teacher", "{:.3f}"),
           Column("held-out CE", "final", "heldout_ce", "{:.3f}"),
           Column("final entropy", "curve", "entropy", "{:.3f}"),
           Column("CE spikes", "stability", "ce_spikes", "{:.1f}"),
           Column("grad spikes", "stability", "grad_spikes", "{:.1f}"),
           Column("grad-norm p95/median", "stability", "grad_norm_p95_over_median", "{:.2f}"),
           Column("step time (ms)", "efficiency", "step_time_ms_mean", "{:.1f}"),
           Column("peak mem (MiB)", "efficiency", "peak_memory_mb", "{:.0f}"))


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
        lines.append(_line(["student before (sft warm-up)", str(len(befores))] + _mean_std_cells(before_statistics)))
    for group, members in groups.items():
        lines.append(_line([group, str(len(members))] + _mean_std_cells(group_statistics(members))))
    return "\n".join(lines)


def _read_summary(out_dir, name):
    """A finished run's summary, with what the report derives from its metrics (recomputed, so that
    a report always uses the current definitions), or None for a run not finished."""
    path = os.path.join(out_dir, "runs", name, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    history = _run_metrics(out_dir, name)
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
        "entropy_per_50_steps": [value for _, value in _curve(history, "entropy", 50)],
        "teacher_entropy_per_50_steps": [value for _, value in _curve(history, "teacher_entropy", 50)]}
    return summary


def write_report(experiment, runs, out_dir):
    """Table (mean ± std over seeds), raw JSON and plots from the summaries of the finished runs
    among `runs` (the experiment's `planned_runs`, in their order)."""
    summaries, groups = [], {}
    for name, group, _, _ in runs:
        summary = _read_summary(out_dir, name)
        if summary is not None:
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
    markdown = results_markdown(teacher, befores, groups)
    write_text_atomic(os.path.join(out_dir, "results.md"), markdown + "\n")
    table = {group: {**{label: list(value) for label, value in group_statistics(members).items()},
                     "seeds": len(members)} for group, members in groups.items()}
    report = {"experiment": {key: value for key, value in experiment.items() if key != "base"},
              "base": experiment["base"], "teacher": teacher, "student_before": befores, "table": table,
              "runs": summaries, "planned": len(runs), "finished": len(summaries),
              "commits": sorted({summary.get("commit") or "unknown" for summary in summaries})}
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
        with writing(os.path.join(out_dir, filename)):
            figure.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(figure)
