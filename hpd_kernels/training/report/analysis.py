"""The report's comparisons between the main runs' groups: the pre-registered primary one, the
secondary ones, and the efficiency measures."""

from __future__ import annotations

import statistics

from ..schema import ACCURACIES
from .measures import mean_std, paired_difference


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
            "auc": mean_std([member["curve"]["auc"] for member in members]),
            "steps_to_baseline": reached, "baseline_final": target}
    return result
