"""Helpers shared by the Triton and the torch implementations."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634

# Per-row stats a forward saves for its backward, the same columns in both backends. The student's
# (and for the divergences the teacher's) log-sum-exp is kept as two numbers, the row maximum of the
# scaled logits and the log of the sum relative to it, so that the backward forms
# `log q = (s / T - max) - log_sum` as `log_softmax` does: `s / T - lse` would lose the digits of a
# large maximum (|s / T| ~ 50 at low temperatures) in every log-probability. Units are the
# backend's own (the Triton kernels work in base 2); only the HPD weights are read by callers.
# `STAT_TOP_S` is a column (exact as a float below 2^24) or -1 for none: the backward writes that
# column as minus the sum of the others (a softmax gradient sums to 0), which avoids the
# cancellation of `w - q W` where q is near 1. The divergences take the student's first argmax;
# HPD, whose weights sit on y and y_hat only, whichever of the two has q > 1/2.
STAT_MAX_S, STAT_LOG_SUM_S, STAT_TOP_S = 0, 1, 2
STAT_MAX_T, STAT_LOG_SUM_T, STAT_ROW_WEIGHT = 3, 4, 5   # divergences
STAT_W_LABEL, STAT_W_SAMPLE = 3, 4                        # HPD: w_y, w_hat
DIVERGENCE_STATS, HYBRID_STATS = 6, 5                     # columns


def temperature_scalars(temperature, acc_dtype):
    """`[scale, scale_low, 1 / T]`: `log2(e) / T` as two numbers of the accumulation dtype (rounded
    down, the rest), whose sum is exact to ~2^-48 (`log2_softmax`), and `1 / T` itself for what the
    kernels compute in natural units (exact at the usual powers of two, where `LN2 * scale` would
    round). The rest is kept strictly positive, so that a `-inf` logit times it is `-inf`, not NaN."""
    scale = LOG2E / temperature
    rounded = torch.tensor(scale, dtype=acc_dtype)
    if rounded.item() >= scale:
        rounded = torch.nextafter(rounded, torch.zeros_like(rounded))
    return [rounded.item(), scale - rounded.item(), 1.0 / temperature]


def active_rows(labels, n_rows, vocab, ignore_index, device):
    """Rows whose label is a real token of the shared vocabulary (every row when there are no labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index) & (labels < vocab)
