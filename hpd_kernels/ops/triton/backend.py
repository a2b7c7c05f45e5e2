"""The Triton backend's entry points, the same four as its peer `ops.torch_backend`, so a backend is
chosen once per call (`ops.backends.choose`) and the autograd Functions take either."""

import math

import torch

from ...registry import STAT_LOG_SUM_S, STAT_MAX_S
from .divergence import divergence_backward, divergence_forward  # noqa: F401
from .hybrid import hybrid_backward, hybrid_forward  # noqa: F401

NAME = "triton"


def label_log_probs(student, labels, stats, temperature):
    """`log q(y)` per row (natural units) from a forward's stats, whose log-sum-exps are the kernels'
    (the max of the unscaled logits, the base-2 log of the sum): one gather, no vocabulary pass.
    Rows with `labels` outside `[0, V_s)` read column 0 (the caller masks them)."""
    safe = torch.where((labels >= 0) & (labels < student.shape[1]), labels, 0)
    logits = student.gather(1, safe[:, None])[:, 0].to(stats.dtype)
    return (logits - stats[:, STAT_MAX_S]) / temperature - math.log(2) * stats[:, STAT_LOG_SUM_S]
