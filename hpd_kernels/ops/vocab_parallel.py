"""Vocabulary-parallel losses: each rank of a process group holds a contiguous slice of the vocabulary.

`VocabParallel(group, vocab_offset)` has the same entry points as `torch_backend` (per-row loss and
stats forward, gradient into a caller's buffer backward), so `DivergenceFunction`,
`HybridFunction` and the fused-linear Function run unchanged on a slice. What crosses ranks is
per-row scalars only, never a `[tokens, vocab]` tensor:

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

import math

import torch
import torch.distributed as dist

from . import torch_backend
from .gumbel import gumbel_torch, row_keys_torch, seed_key
from .torch_backend import _acc_dtype, _chunks, _scaled, _zero_unless, divergence_terms, hpd_row_terms


class VocabParallel:
    def __init__(self, group, vocab_offset, global_vocab):
        self.group, self.offset, self.global_vocab = group, int(vocab_offset), int(global_vocab)

    # -- collectives on per-row scalars -----------------------------------------------------------
    def _sum(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _max(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def _min(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return tensor

    def logsumexp(self, scaled):
        """Global row log-sum-exp of a slice `[rows, V_local]`; `+inf` gives NaN as in the kernels."""
        if scaled.shape[1]:
            local_max = scaled.max(dim=-1).values
        else:
            local_max = scaled.new_full((scaled.shape[0],), -math.inf)
        global_max = self._max(local_max.clone())
        reference = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
        total = self._sum((scaled - reference[:, None]).exp().sum(-1))
        lse = reference + total.log()
        return torch.where(global_max == math.inf, torch.full_like(lse, math.nan), lse)

    def reduce_hidden_grad(self, grad_hidden):
        """dL/dh sums the contributions of every vocabulary slice (fused-linear)."""
        return self._sum(grad_hidden)

    def active_vocab(self, local_vocab):
        return self.global_vocab

    def _local(self, ids):
        """`(owned, local column)` of global token ids."""
        local = ids - self.offset
        return (ids >= self.offset) & (local < self._width), local.clamp(0, max(0, self._width - 1))

    # -- divergences ------------------------------------------------------------------------------
    def divergence_forward(self, student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q,
                           ignore_index):
        self._check_widths(student, teacher)
        n_rows, acc_dtype = student.shape[0], _acc_dtype(student)
        inv_temperature = 1.0 / temperature
        active = self._active(labels, n_rows, student.device, ignore_index)
        loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
        stats = torch.zeros(n_rows, 3, dtype=acc_dtype, device=student.device)
        for rows in _chunks(n_rows, self.global_vocab, acc_dtype):  # same chunks on every rank
            s = _scaled(student, rows, self._width, acc_dtype, inv_temperature)
            t = _scaled(teacher, rows, self._width, acc_dtype, inv_temperature)
            lse_s, lse_t = self.logsumexp(s), self.logsumexp(t)
            value, weight = divergence_terms(s - lse_s[:, None], t - lse_t[:, None], log_mix_p, log_mix_q, divergence)
            sums = self._sum(torch.stack([value.sum(-1), weight.sum(-1)], dim=1))
            loss[rows] = _zero_unless(active[rows], sums[:, 0])
            stats[rows] = torch.stack([lse_s, lse_t, sums[:, 1]], dim=1)
        return loss, stats

    def divergence_backward(self, student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p,
                            log_mix_q):
        self._check_widths(student, teacher)
        return torch_backend.divergence_backward(student, teacher, stats, row_scale, grad, divergence=divergence,
                                                 temperature=temperature, log_mix_p=log_mix_p, log_mix_q=log_mix_q)

    # -- HPD --------------------------------------------------------------------------------------
    def _sample(self, scaled_student, first_row, key):
        """Global Gumbel-max: the slice's best (score, global column), then the best over ranks."""
        device = scaled_student.device
        row_ids = torch.arange(first_row, first_row + scaled_student.shape[0], device=device)
        columns = torch.arange(self.offset, self.offset + scaled_student.shape[1], device=device)
        scores = gumbel_torch(row_keys_torch(key, row_ids), columns).add_(scaled_student.float())
        best, where = scores.max(dim=-1)
        global_best = self._max(best.clone())
        candidate = torch.where(best == global_best, where + self.offset, torch.full_like(where, 2**62))
        return self._min(candidate)

    def _owned_logits(self, logits, rows, ids, acc_dtype, inv_temperature):
        owned, local = self._local(ids)
        values = logits[rows].gather(1, local[:, None])[:, 0].to(acc_dtype) * inv_temperature
        return self._sum(torch.where(owned, values, torch.zeros_like(values)))

    def hybrid_forward(self, student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight,
                       ignore_index, row_offset=0):
        self._check_widths(student, teacher)
        n_rows, acc_dtype = student.shape[0], _acc_dtype(student)
        inv_temperature = 1.0 / temperature
        active = self._active(labels, n_rows, student.device, ignore_index)
        sample = sampled_ids is None
        key = seed_key(seed or 0)
        out_ids = torch.full((n_rows,), ignore_index, dtype=torch.int64, device=student.device)
        loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
        stats = torch.zeros(n_rows, 3, dtype=acc_dtype, device=student.device)
        for rows in _chunks(n_rows, self.global_vocab, acc_dtype):  # same chunks on every rank
            live = active[rows]
            scaled_student = _scaled(student, rows, self._width, acc_dtype, inv_temperature)
            lse_s = self.logsumexp(scaled_student)
            lse_t = self.logsumexp(_scaled(teacher, rows, self._width, acc_dtype, inv_temperature))
            chunk_ids = self._sample(scaled_student, row_offset + rows.start, key) if sample else sampled_ids[rows]
            safe_y = torch.where(live, labels[rows], 0)
            safe_hat = torch.where(live, chunk_ids, 0)
            log_q_y = self._owned_logits(student, rows, safe_y, acc_dtype, inv_temperature) - lse_s
            log_p_y = self._owned_logits(teacher, rows, safe_y, acc_dtype, inv_temperature) - lse_t
            log_q_hat = self._owned_logits(student, rows, safe_hat, acc_dtype, inv_temperature) - lse_s
            log_p_hat = self._owned_logits(teacher, rows, safe_hat, acc_dtype, inv_temperature) - lse_t
            per_row, w_y, w_hat = hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, safe_y, safe_hat, fkl_weight,
                                                rkl_weight)
            loss[rows] = _zero_unless(live, per_row)
            stats[rows] = torch.stack([lse_s, _zero_unless(live, w_y), _zero_unless(live, w_hat)], dim=1)
            out_ids[rows] = torch.where(live, chunk_ids, out_ids[rows])
        return loss, stats, (out_ids if sample else sampled_ids)

    def hybrid_backward(self, student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature):
        self._width = student.shape[1]
        return torch_backend.hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad,
                                             vocab=self._width, temperature=temperature, to_local=self._local)

    # -- checks -----------------------------------------------------------------------------------
    def _check_widths(self, student, teacher):
        if student.shape[1] != teacher.shape[1]:
            raise ValueError(f"vocabulary-parallel losses need the student and teacher slices to cover the same "
                             f"columns; got widths {student.shape[1]} and {teacher.shape[1]}")
        self._width = student.shape[1]

    def _active(self, labels, n_rows, device, ignore_index):
        if labels is None:
            return torch.ones(n_rows, dtype=torch.bool, device=device)
        return (labels != ignore_index) & (labels < self.global_vocab) & (labels >= 0)


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
