"""Training curves as a PNG: loss, cross-entropy, entropy and evaluation metrics against step."""

from __future__ import annotations


PANELS = (
    ("training loss", ("loss",)),
    ("cross-entropy on the data (nats/token)", ("cross_entropy",)),
    ("entropy (nats/token)", ("entropy", "teacher_entropy")),
    ("accuracy (evaluation)", ("eval_greedy_accuracy", "eval_sampled_accuracy")),
    ("held-out (nats/token)", ("eval_heldout_ce", "eval_fkl_to_teacher", "eval_rkl_to_teacher")),
    ("gradient norm (before clipping)", ("grad_norm",)),
)


def plot_runs(runs, path, title=None):
    """Draw one figure of 2x3 panels; `runs` maps a label to its list of metric records.
    Returns `path`, or None when matplotlib is missing (install the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for axis, (ylabel, keys) in zip(axes.flat, PANELS):
        for label, records in runs.items():
            record_keys = [key for key in keys if any(key in record for record in records)]
            for key in record_keys:
                points = [(record["step"], record[key]) for record in records if key in record]
                if not points:
                    continue
                steps, values = zip(*points)
                name = label if len(record_keys) == 1 else f"{label}: {key.removeprefix('eval_')}"
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=name,
                          linestyle="--" if key == "teacher_entropy" else "-")
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
