"""The torch backend: the entry points of `ops.backend_contract.Backend` in plain PyTorch, over a
vocabulary strategy (`vocabulary.py`): the whole vocabulary here, a slice of it under vocabulary
parallelism (`ops.vocab_parallel.VocabParallel`)."""

from __future__ import annotations

import torch

from ...registry import IDENTITY_MAPS, STAT_LOG_SUM_S, STAT_MAX_S
from . import divergence as divergence_passes
from . import hybrid as hybrid_passes
from .row_math import gathered_logits, side_maps
from .vocabulary import WHOLE, Vocabulary


class TorchBackend:
    """The kernels' twin for any device, its row reductions made by `vocabulary`."""

    NAME = "torch"

    def __init__(self, vocabulary: Vocabulary = WHOLE):
        self.vocabulary = vocabulary

    def divergence_forward(self, student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q,
                           ignore_index, logit_maps=IDENTITY_MAPS, with_entropy=False):
        return divergence_passes.divergence_forward(
            student, teacher, labels, divergence=divergence, temperature=temperature, log_mix_p=log_mix_p,
            log_mix_q=log_mix_q, ignore_index=ignore_index, vocabulary=self.vocabulary, logit_maps=logit_maps,
            with_entropy=with_entropy)

    def divergence_backward(self, student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p,
                            log_mix_q, logit_maps=IDENTITY_MAPS):
        return divergence_passes.divergence_backward(
            student, teacher, stats, row_scale, grad, divergence=divergence, temperature=temperature,
            log_mix_p=log_mix_p, log_mix_q=log_mix_q, logit_maps=logit_maps)

    def hybrid_forward(self, student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight,
                       ignore_index, row_ids=None, logit_maps=IDENTITY_MAPS, with_entropy=False):
        return hybrid_passes.hybrid_forward(
            student, teacher, labels, sampled_ids, seed=seed, temperature=temperature, fkl_weight=fkl_weight,
            rkl_weight=rkl_weight, ignore_index=ignore_index, row_ids=row_ids, vocabulary=self.vocabulary,
            logit_maps=logit_maps, with_entropy=with_entropy)

    def hybrid_backward(self, student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature,
                        logit_maps=IDENTITY_MAPS):
        return hybrid_passes.hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, vocab=vocab,
                                             temperature=temperature, vocabulary=self.vocabulary,
                                             logit_maps=logit_maps)

    def label_log_probs(self, student, labels, stats, temperature, logit_maps=IDENTITY_MAPS):
        """`log q(y)` from the stats (the max and log-sum of the mapped, scaled logits, natural units):
        one gather, no vocabulary pass."""
        safe = torch.where((labels >= 0) & (labels < student.shape[1]), labels, 0)
        logits = gathered_logits(student, safe, stats.dtype, 1.0 / temperature, side_maps(logit_maps)[0])
        return (logits - stats[:, STAT_MAX_S]) - stats[:, STAT_LOG_SUM_S]

    def reduce_hidden_grad(self, grad_hidden):
        return grad_hidden  # the whole vocabulary: nothing to add


TORCH = TorchBackend()
