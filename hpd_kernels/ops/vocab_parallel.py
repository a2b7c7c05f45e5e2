"""Vocabulary-parallel losses: each rank of a process group holds a contiguous slice of the vocabulary.

`VocabParallel(group, vocab_offset, global_vocab)` is the torch backend (`ops.torch_backend`) over a
`VocabularySlice`: its passes unchanged, their row reductions made collective. So it is a backend
like the other two (`ops.backend_contract.Backend`), and `RowLosses` and the fused-linear Function
run unchanged on a slice. What crosses ranks is per-row scalars (and, fused-linear, the
`[tokens, hidden]` gradient of the hidden states), never a `[tokens, vocab]` tensor:

- log-sum-exps: a MAX all-reduce of the slice maxima, then a SUM all-reduce of the rescaled sums;
- divergences: the per-token terms need only the global log-sum-exps, so the row loss and the row
  sum of weights `W = sum_v w(v)` are SUM all-reduced partial sums; the gradient of a slice,
  `-(scale / T) (w - q W)`, is then local;
- HPD: `q(y), p(y)` are read by the rank that owns `y` and SUM all-reduced (zeros elsewhere);
  `y_hat` is the Gumbel-max over the whole vocabulary, with the noise keyed by the *global* column,
  so the MAX all-reduce of the slice winners, then a MIN all-reduce of the winning column, draws the
  very token the unsharded kernel draws for the same seed.

The row loss is replicated on every rank; each rank's gradient covers its slice only, so nothing is
double counted. Labels and sampled ids are global token ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..registry import IDENTITY_MAPS
from .gumbel import row_keys_torch
from .torch_backend import TorchBackend, gumbel_scores
from .torch_backend.row_math import gathered_logits, logsumexp_parts

# What `label_log_probs` refuses: the hard-label term's gradient would scatter global label ids
# into a slice's columns.
HARD_LABEL_REFUSAL = ("ce_weight and return_parts are not supported with process_group (vocabulary-parallel) yet; "
                      "add the cross-entropy term with a separate loss there")


class VocabularySlice:
    """The row reductions of the torch backend's passes over one rank's slice of the vocabulary
    (`ops.torch_backend.vocabulary.Vocabulary`): collectives on per-row scalars."""

    local_rows = False  # every row reduction is a collective: the compiled math covers only what lies between

    def __init__(self, group, vocab_offset, global_vocab):
        self.group, self.offset, self.global_vocab = group, int(vocab_offset), int(global_vocab)

    def _reduce(self, tensor, op):
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def label_vocab(self, width):
        return self.global_vocab  # labels are global ids; every slice cuts its chunks by it alike

    def row_sums(self, sums):
        return self._reduce(sums, dist.ReduceOp.SUM)

    def logsumexp(self, scaled):
        """Global row `(max, log_sum)` of a slice `[rows, V_local]`; `+inf` gives NaN as in the kernels."""
        return logsumexp_parts(
            scaled, row_sums=self.row_sums, row_max=lambda local_max: self._reduce(local_max.clone(), dist.ReduceOp.MAX))

    def top_column(self, student, log_sum_s, inv_temperature, logit_map=None):
        """None: the gradient's top-column identity needs the whole row (its sum over all slices)."""
        return torch.full_like(log_sum_s, -1.0)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        return torch.full_like(labels, -1)

    def sample(self, student, row_ids, key, scale):
        """Global Gumbel-max: the slice's best (score, global column), then the best over ranks."""
        device = student.device
        columns = torch.arange(self.offset, self.offset + student.shape[1], device=device)
        best, where = gumbel_scores(student, scale, row_keys_torch(key, row_ids), columns).max(dim=-1)
        global_best = self._reduce(best.clone(), dist.ReduceOp.MAX)
        candidate = torch.where(best == global_best, where + self.offset, torch.full_like(where, 2**62))
        return self._reduce(candidate, dist.ReduceOp.MIN)

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature, logit_map=None):
        """`logits[row, id] / T` (mapped first by `logit_map`) read by the rank that owns `id`, summed
        over ranks (zeros elsewhere)."""
        owned, local = self.local_columns(ids, logits.shape[1])
        values = gathered_logits(logits[rows], local, acc_dtype, inv_temperature, logit_map)
        return self.row_sums(torch.where(owned, values, torch.zeros_like(values)))

    def local_columns(self, ids, width):
        """`(owned, local column)` of global token ids in this slice of `width` columns."""
        local = ids - self.offset
        return (ids >= self.offset) & (local < width), local.clamp(0, max(0, width - 1))


class VocabParallel(TorchBackend):
    """The torch backend on one slice of the vocabulary."""

    def __init__(self, group, vocab_offset, global_vocab):
        super().__init__(VocabularySlice(group, vocab_offset, global_vocab))
        self.global_vocab = self.vocabulary.global_vocab

    def divergence_forward(self, student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q,
                           ignore_index, logit_maps=IDENTITY_MAPS, with_entropy=False):
        _check_widths(student, teacher)
        return super().divergence_forward(student, teacher, labels, divergence=divergence, temperature=temperature,
                                          log_mix_p=log_mix_p, log_mix_q=log_mix_q, ignore_index=ignore_index,
                                          logit_maps=logit_maps, with_entropy=with_entropy)

    def divergence_backward(self, student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p,
                            log_mix_q, logit_maps=IDENTITY_MAPS):
        _check_widths(student, teacher)
        return super().divergence_backward(student, teacher, stats, row_scale, grad, divergence=divergence,
                                           temperature=temperature, log_mix_p=log_mix_p, log_mix_q=log_mix_q,
                                           logit_maps=logit_maps)

    def hybrid_forward(self, student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight,
                       ignore_index, row_ids=None, logit_maps=IDENTITY_MAPS, with_entropy=False):
        _check_widths(student, teacher)
        return super().hybrid_forward(student, teacher, labels, sampled_ids, seed=seed, temperature=temperature,
                                      fkl_weight=fkl_weight, rkl_weight=rkl_weight, ignore_index=ignore_index,
                                      row_ids=row_ids, logit_maps=logit_maps, with_entropy=with_entropy)

    def label_log_probs(self, student, labels, stats, temperature, logit_maps=IDENTITY_MAPS):
        """Refused (`HARD_LABEL_REFUSAL`): only the hard-label term reads it."""
        raise ValueError(HARD_LABEL_REFUSAL)

    def reduce_hidden_grad(self, grad_hidden):
        """dL/dh sums the contributions of every vocabulary slice (fused-linear)."""
        return self.vocabulary.row_sums(grad_hidden)


def _check_widths(student, teacher):
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"vocabulary-parallel losses need the student and teacher slices to cover the same "
                         f"columns; got widths {student.shape[1]} and {teacher.shape[1]}")


def slice_layout(group, local_vocab, vocab_offset=None):
    """`(vocab_offset, global_vocab)` of this rank's slice; the offset defaults to the widths of the
    lower ranks (contiguous slices in rank order)."""
    widths = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, torch.tensor(local_vocab, dtype=torch.int64), group=group)
    widths = [int(width) for width in widths]
    rank = dist.get_rank(group)
    expected = sum(widths[:rank])
    if vocab_offset is None:
        vocab_offset = expected
    return int(vocab_offset), sum(widths)
