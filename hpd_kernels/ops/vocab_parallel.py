"""Vocabulary-parallel losses: each rank of a process group holds a contiguous slice of the vocabulary.

`VocabParallel(group, vocab_offset, global_vocab)` has the entry points of `torch_backend` (per-row
loss and stats forward, gradient into a caller's buffer backward) and runs the torch backend's own
passes, with their row reductions (`torch_backend.WholeVocabulary`) made collective: so
it is a backend like the other two, and `RowLosses` and the fused-linear Function run unchanged on
a slice.
What crosses ranks is per-row scalars (and, fused-linear, the `[tokens, hidden]` gradient of the
hidden states), never a `[tokens, vocab]` tensor:

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

from . import torch_backend
from .gumbel import row_keys_torch


class VocabParallel(torch_backend.WholeVocabulary):
    """The torch backend's passes on one slice, with its row reductions made collective."""

    NAME = torch_backend.NAME
    local_rows = False  # every row reduction is a collective: the compiled math covers only what lies between

    def __init__(self, group, vocab_offset, global_vocab):
        self.group, self.offset, self.global_vocab = group, int(vocab_offset), int(global_vocab)
        self._width = 0

    # -- collectives on per-row scalars -----------------------------------------------------------
    def _reduce(self, tensor, op):
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def label_vocab(self, width):
        return self.global_vocab  # labels are global ids; every slice cuts its chunks by it alike

    def row_sums(self, sums):
        return self._reduce(sums, dist.ReduceOp.SUM)

    def logsumexp(self, scaled):
        """Global row `(max, log_sum)` of a slice `[rows, V_local]`; `+inf` gives NaN as in the kernels."""
        return torch_backend.logsumexp_parts(
            scaled, row_sums=self.row_sums, row_max=lambda local_max: self._reduce(local_max.clone(), dist.ReduceOp.MAX))

    def top_column(self, student, log_sum_s, inv_temperature):
        """None: the gradient's top-column identity needs the whole row (its sum over all slices)."""
        return torch.full_like(log_sum_s, -1.0)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        return torch.full_like(labels, -1)

    def sample(self, student, first_row, key, scale):
        """Global Gumbel-max: the slice's best (score, global column), then the best over ranks."""
        device = student.device
        row_ids = torch.arange(first_row, first_row + student.shape[0], device=device)
        columns = torch.arange(self.offset, self.offset + student.shape[1], device=device)
        best, where = torch_backend.gumbel_scores(student, scale, row_keys_torch(key, row_ids), columns).max(dim=-1)
        global_best = self._reduce(best.clone(), dist.ReduceOp.MAX)
        candidate = torch.where(best == global_best, where + self.offset, torch.full_like(where, 2**62))
        return self._reduce(candidate, dist.ReduceOp.MIN)

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature):
        """`logits[row, id] / T` read by the rank that owns `id`, summed over ranks (zeros elsewhere)."""
        owned, local = self._local(ids)
        values = logits[rows].gather(1, local[:, None])[:, 0].to(acc_dtype) * inv_temperature
        return self.row_sums(torch.where(owned, values, torch.zeros_like(values)))

    def reduce_hidden_grad(self, grad_hidden):
        """dL/dh sums the contributions of every vocabulary slice (fused-linear)."""
        return self.row_sums(grad_hidden)

    def _local(self, ids):
        """`(owned, local column)` of global token ids."""
        local = ids - self.offset
        return (ids >= self.offset) & (local < self._width), local.clamp(0, max(0, self._width - 1))

    # -- the implementation interface of DivergenceFunction, HybridFunction and fused-linear --------
    def divergence_forward(self, student, teacher, labels, **options):
        self._check_widths(student, teacher)
        return torch_backend.divergence_forward(student, teacher, labels, vocabulary=self, **options)

    def divergence_backward(self, student, teacher, stats, row_scale, grad, **options):
        self._check_widths(student, teacher)
        return torch_backend.divergence_backward(student, teacher, stats, row_scale, grad, **options)

    def hybrid_forward(self, student, teacher, labels, sampled_ids, **options):
        self._check_widths(student, teacher)
        return torch_backend.hybrid_forward(student, teacher, labels, sampled_ids, vocabulary=self, **options)

    def hybrid_backward(self, student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature):
        self._width = student.shape[1]
        return torch_backend.hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad,
                                             vocab=self._width, temperature=temperature, to_local=self._local)

    def _check_widths(self, student, teacher):
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"vocabulary-parallel losses need the student and teacher slices to cover the same "
                             f"columns; got widths {student.shape[1]} and {teacher.shape[1]}")
        self._width = student.shape[1]


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
