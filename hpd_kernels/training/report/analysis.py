"""The report's comparisons between the main runs' groups: the pre-registered primary one, the
secondary ones, and the efficiency measures."""

from __future__ import annotations

import statistics

from ..schema import ACCURACIES
from .measures import mean_std, paired_difference, t_quantile_975, verdict, wilcoxon_signed_rank


def value_at(member, metric, budget=None):
    """A run's `metric` after `budget` steps (None: its last step), or None when it has no full
    evaluation there (it stopped before, or evaluated in between)."""
    if budget is None or budget == member["config"]["steps"]:
        return member["final"].get(metric)
    return next((record.get(f"eval_{metric}") for record in member.get("curves", {}).get("eval", [])
                 if record["step"] == budget), None)


def _paired(groups, treatment, control, metric, budget=None):
    """`paired_difference` of `metric` (after `budget` steps) between two groups, over the seeds both
    have it for."""
    by_seed = {group: {member["seed"]: value_at(member, metric, budget) for member in groups.get(group, [])}
               for group in (treatment, control)}
    seeds = sorted(seed for seed in by_seed[treatment] if seed in by_seed[control]
                   and by_seed[treatment][seed] is not None and by_seed[control][seed] is not None)
    if not seeds:
        return None
    return {"seeds": seeds, **paired_difference([by_seed[treatment][seed] for seed in seeds],
                                                [by_seed[control][seed] for seed in seeds])}


def analysis(experiment, groups, baseline="seqkd", teacher_entropy=None):
    """The comparisons of the report, from the main runs' groups: the pre-registered primary one,
    the treatment against every other arm on each metric (secondary), and the efficiency measures
    (area under the primary metric's curve; steps until each run first reaches the baseline's final
    mean, when the baseline ran). With budgets or listed comparisons: each comparison at each budget
    with a signed-rank test and its verdict; with `teacher_entropy` (`{temperature: nats}`): each
    arm's entropy against the teacher's on its own samples."""
    primary = experiment["primary"]
    metric, treatment = primary["metric"], primary["treatment"]
    result = {"primary": {**primary, "result": _paired(groups, treatment, primary["control"], metric)},
              "secondary": {}, "efficiency": {}}
    for group in groups:
        if group != treatment:
            result["secondary"][group] = {name: _paired(groups, treatment, group, name, primary.get("budget"))
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
    if experiment.get("budgets") or experiment.get("comparisons") or primary.get("budget"):
        result["budgets"] = _budgets(experiment, groups)
        result["primary"]["result"] = result["budgets"][str(primary.get("budget"))]["primary"]
    if teacher_entropy:
        result["diversity"] = _diversity(groups, teacher_entropy)
    return result


def _tested(groups, treatment, control, metric, budget):
    """`_paired`, with Wilcoxon's signed-rank test and the pre-registered verdict."""
    outcome = _paired(groups, treatment, control, metric, budget)
    if outcome is not None:
        outcome["wilcoxon"] = wilcoxon_signed_rank(outcome["differences"])
        outcome["verdict"] = verdict(outcome)
    return outcome


def _budgets(experiment, groups):
    """At each budget (and at the primary's): the primary comparison and every listed one, each with
    its t-interval, signed-rank test and verdict. The key "None" is each run's last step."""
    primary = experiment["primary"]
    budgets = sorted(set(experiment.get("budgets", [])) | {primary.get("budget")} - {None})
    result = {}
    for budget in budgets + ([None] if primary.get("budget") is None else []):
        pairs = [primary] + list(experiment.get("comparisons", []))
        result[str(budget)] = {
            "primary": _tested(groups, primary["treatment"], primary["control"], primary["metric"], budget),
            "comparisons": [{"treatment": pair["treatment"], "control": pair["control"],
                             "result": _tested(groups, pair["treatment"], pair["control"], primary["metric"], budget)}
                            for pair in pairs[1:]]}
    return result


def _diversity(groups, teacher_entropy):
    """Each group that distils on the teacher's samples: its students' entropy (training batches, the
    last 50 steps) against the teacher's own entropy on the samples of that temperature
    (`teacher_entropy`: `{temperature: nats}`), as a ratio per seed with its 95% t-interval."""
    result = {}
    for group, members in groups.items():
        temperatures = {member.get("teacher_temperature") for member in members}
        if len(temperatures) != 1 or None in temperatures or f"{next(iter(temperatures)):g}" not in teacher_entropy:
            continue
        temperature = next(iter(temperatures))
        reference = teacher_entropy[f"{temperature:g}"]
        ratios = [member["curve"]["entropy"] / reference for member in members
                  if member["curve"].get("entropy") is not None]
        mean, std = mean_std(ratios)
        half = t_quantile_975(len(ratios) - 1) * std / len(ratios) ** 0.5 if len(ratios) > 1 else None
        result[group] = {"teacher_temperature": temperature, "teacher_entropy": reference,
                         "entropy": mean_std([member["curve"]["entropy"] for member in members]),
                         "ratio": mean, "ratio_ci95": None if half is None else [mean - half, mean + half],
                         "seeds": len(ratios)}
    return result
