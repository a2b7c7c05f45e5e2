"""Helpers shared by the Triton and the torch implementations."""

from __future__ import annotations

import torch

# Per-row stats a forward saves for its backward, the same columns in both backends. The student's
# (and for the divergences the teacher's) log-sum-exp is kept as two numbers, the row maximum of the
# scaled logits and the log of the sum relative to it, so that the backward forms
# `log q = (s / T - max) - log_sum` as `log_softmax` does: `s / T - lse` would lose the digits of a
# large maximum (|s / T| ~ 50 at low temperatures) in every log-probability. Units are the
# backend's own (the Triton kernels work in base 2); only the HPD weights are read by callers.
STAT_MAX_S, STAT_LOG_SUM_S = 0, 1
STAT_MAX_T, STAT_LOG_SUM_T, STAT_ROW_WEIGHT = 2, 3, 4   # divergences
STAT_W_LABEL, STAT_W_SAMPLE = 2, 3                        # HPD: w_y, w_hat
DIVERGENCE_STATS, HYBRID_STATS = 5, 4                     # columns


def active_rows(labels, n_rows, vocab, ignore_index, device):
    """Rows whose label is a real token of the shared vocabulary (every row when there are no labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index) & (labels < vocab)
