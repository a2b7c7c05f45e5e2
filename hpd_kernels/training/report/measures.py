"""The measures the report computes from runs: stability of a run's training, means over seeds,
paired differences with their t-intervals, and a curve's area."""

from __future__ import annotations

import statistics

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


def mean_std(values):
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric_curve(history, key, smooth=1):
    """`(steps, values)` of one metric in a run's records, averaged over `smooth` steps."""
    points = [(record["step"], record[key]) for record in history if key in record]
    if smooth > 1:
        points = [(points[index + smooth - 1][0], statistics.fmean(value for _, value in points[index:index + smooth]))
                  for index in range(0, len(points) - smooth + 1, smooth)]
    return points


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


def wilcoxon_signed_rank(differences):
    """Wilcoxon's signed-rank test of paired differences against a median of 0, exact: `statistic`
    is the rank sum of the positive differences (zeros dropped, ties given their mean rank), `p` the
    two-sided p-value from its exact distribution over the 2^n equally likely sign patterns."""
    nonzero = sorted((difference for difference in differences if difference != 0), key=abs)
    count = len(nonzero)
    if count == 0:
        return {"statistic": None, "p": None, "pairs": 0}
    # Doubled mean ranks are integers even with ties: the sign-pattern distribution is counted exactly.
    doubled, index = [], 0
    while index < count:
        end = index
        while end + 1 < count and abs(nonzero[end + 1]) == abs(nonzero[index]):
            end += 1
        doubled += [index + end + 2] * (end - index + 1)
        index = end + 1
    positive = sum(rank for rank, difference in zip(doubled, nonzero) if difference > 0)
    ways = [1] + [0] * sum(doubled)  # ways[s]: sign patterns whose positive doubled-rank sum is s
    for rank in doubled:
        for total in range(len(ways) - 1, rank - 1, -1):
            ways[total] += ways[total - rank]
    patterns = 2 ** count
    below, above = sum(ways[:positive + 1]) / patterns, sum(ways[positive:]) / patterns
    return {"statistic": positive / 2, "p": min(1.0, 2 * min(below, above)), "pairs": count}


def verdict(outcome, level=0.05):
    """The pre-registered decision on a paired comparison: the treatment is better (worse) when its
    95% t-interval lies above (below) 0 and the signed-rank test rejects at `level`; not
    distinguishable when neither test does; otherwise the two tests disagree."""
    interval, test = outcome.get("ci95"), outcome.get("wilcoxon") or {}
    t_rejects = interval is not None and (interval[0] > 0 or interval[1] < 0)
    rank_rejects = test.get("p") is not None and test["p"] < level
    if t_rejects and rank_rejects:
        return "treatment better" if interval[0] > 0 else "treatment worse"
    return "the tests disagree" if t_rejects or rank_rejects else "not distinguishable"


def area_under_curve(points):
    """The trapezoidal mean of a curve `[(step, value)]` over its steps (its value if one point)."""
    if len(points) == 1:
        return points[0][1]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])
