"""The Triton backend: the kernels' wrappers as the entry points of `ops.backend_contract.Backend`,
so a backend is chosen once per call (`ops.backends.choose`) and the autograd Functions take any."""

import math

import torch

from ...registry import IDENTITY_MAPS, STAT_LOG_SUM_S, STAT_MAX_S
from ..common import map_logits
from .divergence import divergence_backward, divergence_forward
from .hybrid import hybrid_backward, hybrid_forward


class TritonBackend:
    """The streaming kernels of `divergence.py` and `hybrid.py` over the whole vocabulary."""

    NAME = "triton"
    divergence_forward = staticmethod(divergence_forward)
    divergence_backward = staticmethod(divergence_backward)
    hybrid_forward = staticmethod(hybrid_forward)
    hybrid_backward = staticmethod(hybrid_backward)

    @staticmethod
    def label_log_probs(student, labels, stats, temperature, logit_maps=IDENTITY_MAPS):
        """`log q(y)` from the kernels' stats (the max of the unscaled, mapped logits, the base-2 log
        of the sum): one gather, mapped as the kernels map it, no vocabulary pass."""
        safe = torch.where((labels >= 0) & (labels < student.shape[1]), labels, 0)
        logits = student.gather(1, safe[:, None])[:, 0].to(stats.dtype)
        if not logit_maps.student_is_identity:
            logits = map_logits(logits, logit_maps.student_scale, logit_maps.student_softcap)
        return (logits - stats[:, STAT_MAX_S]) / temperature - math.log(2) * stats[:, STAT_LOG_SUM_S]

    @staticmethod
    def reduce_hidden_grad(grad_hidden):
        return grad_hidden  # the whole vocabulary: nothing to add


TRITON = TritonBackend()
