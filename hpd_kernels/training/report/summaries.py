"""A finished run's summary as the report reads it back from disk, with what the report derives
from the run's metrics."""

from __future__ import annotations

import json
import os
import statistics

from ..jsonfiles import read_metrics
from .measures import area_under_curve, metric_curve, stability


def summary_path(out_dir, name):
    """Where a run of an experiment writes its summary: it is finished once this exists."""
    return os.path.join(out_dir, "runs", name, "summary.json")


def run_metrics(out_dir, name):
    return read_metrics(os.path.join(out_dir, "runs", name, "metrics.jsonl"))


def read_summary(out_dir, name, metric, start=None):
    """A finished run's summary, with what the report derives from its metrics (recomputed, so that
    a report always uses the current definitions), or None for a run not finished. `start` is the
    warm student's value of `metric`, the curve's point at step 0."""
    path = summary_path(out_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    history = run_metrics(out_dir, name)
    summary["stability"] = stability(history, summary["config"]["max_grad_norm"])
    tail = [record["entropy"] for record in history[-50:]]
    teacher_tail = [record["teacher_entropy"] for record in history[-50:] if "teacher_entropy" in record]
    primary = ([(0, start)] if start is not None else []) + metric_curve(history, f"eval_{metric}")
    summary["curve"] = {"entropy": statistics.fmean(tail) if tail else None,
                        "teacher_entropy": statistics.fmean(teacher_tail) if teacher_tail else None,
                        "primary": primary, "auc": area_under_curve(primary) if primary else None}
    # The curves behind the plots, small enough for the raw JSON: every evaluation, and the
    # training-batch entropies averaged over 50 steps.
    summary["curves"] = {
        "eval": [{key: value for key, value in record.items() if key == "step" or key.startswith("eval_")}
                 for record in history if any(key.startswith("eval_") for key in record)],
        "entropy_per_50_steps": [value for _, value in metric_curve(history, "entropy", 50)],
        "teacher_entropy_per_50_steps": [value for _, value in metric_curve(history, "teacher_entropy", 50)]}
    return summary


def read_json(path, default):
    if not os.path.isfile(path):
        return default
    with open(path) as handle:
        return json.load(handle)
