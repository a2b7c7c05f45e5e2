"""The report's Markdown: the table of every group of runs (mean ± std over seeds, one `Column`
of `COLUMNS` each) and the comparisons, the tuning and the efficiency measures."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..schema import ACCURACIES
from .measures import mean_std


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
    return {column.label: mean_std([column.value(member) for member in members]) for column in COLUMNS}


def _percent(value):
    return f"{100 * value:+.1f}"


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
    lines = [_line(["run", "seeds", "steps"] + [column.label for column in COLUMNS]),
             "|---|---:|---:|" + "---:|" * len(COLUMNS),
             _line(["teacher", "-", "-"] + teacher_cells)]
    if befores:
        before_statistics = group_statistics([{"final": before} for before in befores])
        lines.append(_line(["student before (sft warm-up on gold)", str(len(befores)), "0"]
                           + _mean_std_cells(before_statistics)))
    for group, members in groups.items():
        # Arms may run to different budgets: each row's values are after its own runs' steps.
        steps = "/".join(str(value) for value in sorted({member["config"]["steps"] for member in members}))
        lines.append(_line([group, str(len(members)), steps] + _mean_std_cells(group_statistics(members))))
    return "\n".join(lines)


def analysis_markdown(experiment, result, selection):
    """The primary comparison, the secondary ones, the tuning and the efficiency, as Markdown."""
    primary = result["primary"]
    lines = _primary_lines(primary)
    if result["secondary"]:
        lines += _secondary_lines(primary, result["secondary"])
    if selection:
        lines += _tuning_lines(primary, selection)
    if result["efficiency"]:
        lines += _efficiency_lines(primary, result["efficiency"])
    if result.get("budgets"):
        lines += _budget_lines(primary, result["budgets"])
    if result.get("diversity"):
        lines += _diversity_lines(result["diversity"])
    return "\n".join(lines)


def _budget_lines(primary, budgets):
    lines = ["", f"Pre-registered comparisons of {primary['metric']} at each budget, paired by seed, in points: "
             f"mean, 95% t-interval, exact two-sided Wilcoxon signed-rank p, and the verdict (better or worse: "
             f"the interval excludes 0 and p < 0.05). A comparison is listed at the budgets both its arms "
             f"reached.", "",
             _line(["budget (steps)", "comparison", "seeds", "mean", "95% CI", "signed-rank p",
                    "seeds favouring treatment", "verdict"]),
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for budget, entry in budgets.items():
        compared = [(primary["treatment"], primary["control"], entry["primary"])] + [
            (pair["treatment"], pair["control"], pair["result"]) for pair in entry["comparisons"]]
        for index, (treatment, control, outcome) in enumerate(compared):
            if outcome is None and index > 0:
                continue
            if outcome is None:
                lines.append(_line(["last" if budget == "None" else budget, f"{treatment} - {control}", "0"]
                                   + ["-"] * 5))
                continue
            interval = ("-" if outcome["ci95"] is None else
                        f"[{_percent(outcome['ci95'][0])}, {_percent(outcome['ci95'][1])}]")
            p = outcome["wilcoxon"]["p"]
            lines.append(_line(["last" if budget == "None" else budget, f"{treatment} - {control}",
                                str(outcome["pairs"]), _percent(outcome["mean"]), interval,
                                "-" if p is None else f"{p:.4f}", f"{outcome['treatment_better']}/{outcome['pairs']}",
                                outcome["verdict"]]))
    return lines


def _diversity_lines(diversity):
    lines = ["", "Diversity: each arm's entropy on its training batches (the last 50 steps) against the "
             "teacher's own entropy on the samples it distils on (`teacher_data*.json`), per seed, mean "
             "ratio with its 95% t-interval.", "",
             "| arm | teacher's samples drawn at T | teacher's entropy | arm's entropy | ratio [95% CI] | seeds |",
             "|---|---:|---:|---:|---:|---:|"]
    for group, entry in diversity.items():
        mean, std = entry["entropy"]
        interval = "" if entry["ratio_ci95"] is None else (
            f" [{entry['ratio_ci95'][0]:.2f}, {entry['ratio_ci95'][1]:.2f}]")
        lines.append(_line([group, f"{entry['teacher_temperature']:g}", f"{entry['teacher_entropy']:.3f}",
                            f"{mean:.3f} ± {std:.3f}", f"{entry['ratio']:.2f}x{interval}", str(entry["seeds"])]))
    return lines


def _primary_lines(primary):
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
    return lines


def _secondary_lines(primary, secondary):
    lines = ["", f"Secondary (not corrected for multiplicity): {primary['treatment']} - each arm, paired by "
             f"seed, mean [95% CI] in points.", "", "| arm | top-p acc | T=1 acc | greedy acc |", "|---|---|---|---|"]
    for group, metrics in secondary.items():
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
    return lines


def _tuning_lines(primary, selection):
    rates = sorted({rate for entry in selection.values() for rate in entry["validation"]}, key=float)
    lines = ["", f"Learning rate per arm: {primary['metric']} on the validation split at the tuning seed "
             f"(selected in bold).", "", _line(["arm"] + [f"lr {rate}" for rate in rates]),
             "|---|" + "---:|" * len(rates)]
    for group, entry in selection.items():
        cells = []
        for rate in rates:
            value = entry["validation"].get(rate)
            text = "-" if value is None else f"{value:.1%}"
            cells.append(f"**{text}**" if value is not None and float(rate) == entry["lr"] else text)
        lines.append(_line([group] + cells))
    return lines


def _efficiency_lines(primary, efficiency):
    target = next(iter(efficiency.values()))["baseline_final"]
    reach = ("steps to the baseline's final " + (f"({target:.1%})" if target is not None else "(no baseline)"))
    lines = ["", f"Efficiency: area under the {primary['metric']} curve (mean over the evaluations, the warm "
             f"student at step 0), and the first evaluation step at which each seed reaches the baseline's "
             f"final mean.", "", _line(["arm", "AUC", reach]), "|---|---:|---|"]
    for group, entry in efficiency.items():
        mean, std = entry["auc"]
        steps = "-" if target is None else ", ".join("never" if step is None else str(step)
                                                     for step in entry["steps_to_baseline"])
        lines.append(_line([group, "-" if mean is None else f"{mean:.1%} ± {std:.1%}", steps]))
    return lines
