"""The experiment's plots: accuracy.png and entropy.png, one line per group of runs; primary.png,
the pre-registered comparison's two arms from the warm student on, and their paired difference."""

from __future__ import annotations

import os
import statistics

from ..jsonfiles import writing
from .measures import metric_curve, paired_difference
from .summaries import run_metrics


def plot_experiment(experiment, out_dir, groups, teacher):
    """accuracy.png and entropy.png: one line per objective (mean over seeds) with a min-max band;
    primary.png: the primary comparison alone (`plot_primary`)."""
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
                _plot_group(axis, out_dir, group, groups[group], key, smooth if key == "entropy" else 1,
                            "-" if group in main_groups else ":")
            _plot_teacher(axis, out_dir, key, smooth, [member for group in main_groups for member in groups[group]],
                          teacher)
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
    plot_primary(experiment, out_dir, groups, teacher, plt)


def plot_primary(experiment, out_dir, groups, teacher, plt):
    """primary.png: the primary metric of the treatment and control arms from step 0 (the warm
    student, evaluated on the same split) to their last evaluation, mean over seeds with a min-max
    band; beside it their paired difference at every evaluation with its 95% t-interval. This is
    where a dip after the start, or a lead that changes sign, shows."""
    primary = experiment["primary"]
    metric, arms = primary["metric"], (primary["treatment"], primary["control"])
    if not all(groups.get(arm) for arm in arms):
        return
    curves = {arm: {member["seed"]: dict(member["curve"]["primary"]) for member in groups[arm]} for arm in arms}
    figure, (levels, gaps) = plt.subplots(1, 2, figsize=(13, 4.8))
    for arm in arms:
        steps = sorted(set.intersection(*(set(curve) for curve in curves[arm].values())))
        columns = [[curve[step] for curve in curves[arm].values()] for step in steps]
        line, = levels.plot(steps, [statistics.fmean(column) for column in columns], "-o", markersize=3,
                            label=f"{arm} (n={len(curves[arm])})")
        levels.fill_between(steps, [min(column) for column in columns], [max(column) for column in columns],
                            color=line.get_color(), alpha=0.15)
    if metric in teacher:
        levels.axhline(teacher[metric], color="k", linestyle="--", label="teacher")
    seeds = sorted(set(curves[arms[0]]) & set(curves[arms[1]]))
    steps = sorted(set.intersection(*(set(curves[arm][seed]) for arm in arms for seed in seeds)))
    outcomes = [paired_difference([curves[arms[0]][seed][step] for seed in seeds],
                                  [curves[arms[1]][seed][step] for seed in seeds]) for step in steps]
    gaps.plot(steps, [outcome["mean"] for outcome in outcomes], "-o", markersize=3, color="C2",
              label=f"{arms[0]} - {arms[1]} (paired, n={len(seeds)})")
    if len(seeds) > 1:
        gaps.fill_between(steps, [outcome["ci95"][0] for outcome in outcomes],
                          [outcome["ci95"][1] for outcome in outcomes], color="C2", alpha=0.2, label="95% t-interval")
    gaps.axhline(0, color="k", linewidth=0.8)
    for axis, title in ((levels, f"{metric} (step 0: the warm student)"),
                        (gaps, f"{metric}: paired difference")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"primary comparison: {arms[0]} against {arms[1]}, mean over seeds")
    figure.tight_layout()
    with writing(os.path.join(out_dir, "primary.png")):
        figure.savefig(os.path.join(out_dir, "primary.png"), dpi=110)
    plt.close(figure)


def _plot_group(axis, out_dir, group, members, key, smooth, style):
    """One group's curve of `key`: the mean over its runs, with a min-max band."""
    curves = [metric_curve(run_metrics(out_dir, member["name"]), key, smooth) for member in members]
    length = min(len(curve) for curve in curves)
    if not length:
        return
    steps = [step for step, _ in curves[0][:length]]
    values = [[curve[index][1] for curve in curves] for index in range(length)]
    mean = [statistics.fmean(column) for column in values]
    line, = axis.plot(steps, mean, style, label=f"{group} (n={len(curves)})",
                      marker="o" if length < 30 else None, markersize=3)
    axis.fill_between(steps, [min(column) for column in values], [max(column) for column in values],
                      color=line.get_color(), alpha=0.15)


def _plot_teacher(axis, out_dir, key, smooth, main_members, teacher):
    """The teacher's reference on the panel of `key`: its entropy on the first distilling run's
    batches, or its own evaluation."""
    if key == "entropy":
        teacher_curve = [metric_curve(run_metrics(out_dir, member["name"]), "teacher_entropy", smooth)
                         for member in main_members if member["config"]["objective"] != "sft"][:1]
        if teacher_curve and teacher_curve[0]:
            axis.plot(*zip(*teacher_curve[0]), "k--", label="teacher")
    if key.startswith("eval_") and key.removeprefix("eval_") in teacher:
        axis.axhline(teacher[key.removeprefix("eval_")], color="k", linestyle="--", label="teacher")
