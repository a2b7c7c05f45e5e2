"""The experiment's plots: accuracy.png and entropy.png, one line per group of runs."""

from __future__ import annotations

import os
import statistics

from ..jsonfiles import writing
from .measures import metric_curve
from .summaries import run_metrics


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
