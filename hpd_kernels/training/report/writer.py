"""`write_report`: the report of an experiment, rebuilt from the finished runs on disk."""

from __future__ import annotations

import os

from ..jsonfiles import write_json_atomic, write_text_atomic
from .analysis import analysis
from .plots import plot_experiment
from .summaries import read_json, read_summary
from .tables import analysis_markdown, group_statistics, results_markdown


def write_report(experiment, runs, out_dir, selection=None, warm_of=None):
    """Table (mean ± std over seeds), comparisons, raw JSON and plots from the summaries of the
    finished runs among `runs` (the experiment's tuning and main runs, in their order); `selection`
    is the learning-rate tuning's outcome; `warm_of(seed)` the seed of the warm student a run at
    `seed` started from (default: its own)."""
    warm_of = warm_of or (lambda seed: seed)
    metric = experiment["primary"]["metric"]
    teacher = read_json(os.path.join(out_dir, "teacher_evaluation.json"), {})
    warm = {}
    for seed in sorted({warm_of(run.seed) for run in runs}):
        evaluation = read_json(os.path.join(out_dir, f"warmup-seed{seed}", "evaluation.json"), None)
        if evaluation is not None:
            warm[seed] = evaluation
    teacher_data = {name: read_json(os.path.join(out_dir, name), None) for name in sorted(os.listdir(out_dir))
                    if name.startswith("teacher_data") and name.endswith(".json")}
    teacher_entropy = teacher_entropies(teacher_data.values())
    summaries, tuning, groups = [], [], {}
    for run in runs:
        start = warm.get(warm_of(run.seed), {}).get("validation" if run.tuning else "test", {}).get(metric)
        summary = read_summary(out_dir, run.name, metric, start)
        if summary is None:
            continue
        if run.tuning:
            tuning.append(summary)
        else:
            summaries.append(summary)
            groups.setdefault(run.group, []).append(summary)
    warm_seeds = {warm_of(seed) for seed in experiment["seeds"]}
    befores = [warm[seed]["test"] for seed in sorted(warm) if seed in warm_seeds]
    result = analysis(experiment, groups, teacher_entropy=teacher_entropy)
    markdown = report_markdown(experiment, teacher, befores, groups, result, selection)
    write_text_atomic(os.path.join(out_dir, "results.md"), markdown + "\n")
    table = {group: {**{label: list(value) for label, value in group_statistics(members).items()},
                     "seeds": len(members)} for group, members in groups.items()}
    report = {"experiment": {key: value for key, value in experiment.items() if key != "base"},
              "base": experiment["base"], "teacher": teacher, "teacher_data": teacher_data.get("teacher_data.json"),
              "teacher_data_other_temperatures": {name: info for name, info in teacher_data.items()
                                                  if name != "teacher_data.json"},
              "student_before": befores, "table": table, "analysis": result, "lr_selection": selection,
              "runs": summaries, "tuning_runs": tuning, "planned": len(runs), "finished": len(summaries) + len(tuning),
              "commits": sorted({summary.get("commit") or "unknown" for summary in summaries + tuning})}
    write_json_atomic(os.path.join(out_dir, "results.json"), report)
    plot_experiment(experiment, out_dir, groups, teacher)
    report["markdown"] = markdown
    return report


def teacher_entropies(teacher_data):
    """`{temperature: nats}`: the teacher's entropy on its own samples at each temperature, from the
    teacher-data infos (`teacher_data*.json`) that record it."""
    return {f"{info['temperature']:g}": info["teacher_entropy"] for info in teacher_data
            if info and "teacher_entropy" in info}


def report_markdown(experiment, teacher, befores, groups, result, selection):
    """results.md without its final newline: the table of every group, then the comparisons."""
    return results_markdown(teacher, befores, groups) + "\n\n" + analysis_markdown(experiment, result, selection)
