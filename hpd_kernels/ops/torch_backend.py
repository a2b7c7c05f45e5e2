"""The same math as the Triton kernels, in plain PyTorch, for any device.

The torch backend: the same four entry points and outputs as the Triton backend (`ops/triton/`:
per-row loss, per-row stats, gradient written into a caller's buffer), so the autograd Functions do
not care which runs.
Rows are processed in chunks whose float32 temporaries stay under a fixed budget, so no
`[N, V]` float32 tensor exists here either; float64 inputs are computed in float64.
"""

from __future__ import annotations

import math

import torch

from ..registry import DIVERGENCE_STATS, HYBRID_STATS, STAT_LOG_SUM_S, STAT_MAX_S, accumulation_dtype
from .common import active_rows, temperature_scalars
from .gumbel import gumbel2_torch, row_keys_torch, seed_key

NAME = "torch"

# Bytes of one chunk's [rows, V] temporaries in the accumulation dtype. The divergences keep about
# eight of them alive at once, so 8 MiB each bounds a chunk's working set near 64 MiB.
CHUNK_BYTES = 8 * 2**20


def _rows_per_chunk(vocab: int, acc_dtype: torch.dtype) -> int:
    item = torch.finfo(acc_dtype).bits // 8
    return max(1, CHUNK_BYTES // max(1, vocab * item))


def _zero_unless(condition, value):
    return torch.where(condition, value, torch.zeros_like(value))


def _zero_if(condition, value):
    """0 where `condition`; conditions test `== 0` so that NaN stays NaN (see the Triton twin)."""
    return torch.where(condition, torch.zeros_like(value), value)


def logsumexp_parts(scaled_logits, row_sums=lambda sums: sums, row_max=lambda local_max: local_max):
    """`(max, log_sum)` of each row, `lse = max + log_sum` kept apart (see `registry.STAT_MAX_S`):
    the max is 0 for a row of `-inf` only; a `+inf` logit gives NaN, as in the kernels (torch's own
    log-sum-exp gives +inf, which HPD's branches would then turn into a silent 0). `row_sums` and
    `row_max` combine the partial results of vocabulary slices."""
    if scaled_logits.shape[1]:
        local_max = scaled_logits.max(dim=-1).values
    else:
        local_max = scaled_logits.new_full((scaled_logits.shape[0],), -math.inf)
    reference = row_max(local_max)
    reference = torch.where(reference == -math.inf, torch.zeros_like(reference), reference)
    log_sum = row_sums((scaled_logits - reference[:, None]).exp().sum(-1)).log()
    return reference, torch.where(reference == math.inf, torch.full_like(log_sum, math.nan), log_sum)


def _defined(*row_log_sums):
    """Rows with a distribution on every side: a row whose logits are all `-inf` has
    `log_sum = -inf` and no softmax; it contributes 0 and gets no gradient. (A `+inf` logit's NaN
    is not `-inf`: it stays NaN.)"""
    defined = row_log_sums[0] != -math.inf
    for log_sum in row_log_sums[1:]:
        defined = defined & (log_sum != -math.inf)
    return defined


def _log_softmax(scaled_logits, row_max, row_log_sum):
    """The maximum first, as `log_softmax` does: no digits lost to a large `max`."""
    return (scaled_logits - row_max[:, None]) - row_log_sum[:, None]


def _logaddexp(a, b):
    larger = torch.maximum(a, b)
    reference = torch.where(larger == -math.inf, torch.zeros_like(larger), larger)
    return reference + torch.log(torch.exp(a - reference) + torch.exp(b - reference))


def divergence_terms(log_q, log_p, log_mix_p, log_mix_q, divergence):
    """Per-token value and weight `w` of one divergence (mirror of the Triton `divergence_terms`)."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        value = _zero_if(p == 0, p * (log_p - log_q))
        return value, p
    if divergence == "reverse_kl":
        value = _zero_if(q == 0, q * (log_q - log_p))
        return value, -value
    if divergence == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(p - q)
    log_m = _logaddexp(log_mix_p + log_p, log_mix_q + log_q)
    if divergence == "jsd":
        value = (math.exp(log_mix_p) * _zero_if(p == 0, p * (log_p - log_m))
                 + math.exp(log_mix_q) * _zero_if(q == 0, q * (log_q - log_m)))
        weight = math.exp(log_mix_q) * _zero_if(q == 0, q * (log_m - log_q))
    elif divergence == "skew_forward_kl":
        value = _zero_if(p == 0, p * (log_p - log_m))
        # p * (q / m), the ratio from logs: it stays O(1) where q alone underflows to 0 (alpha -> 0).
        weight = _zero_if((log_p == -math.inf) | (log_q == -math.inf), p * torch.exp(log_mix_q + log_q - log_m))
    elif divergence == "skew_reverse_kl":
        value = _zero_if(q == 0, q * (log_q - log_m))
        weight = _zero_if(q == 0, q * (log_m - log_q + torch.exp(log_mix_q + log_q - log_m)))
    else:
        raise ValueError(divergence)
    return value, weight


def _chunks(n_rows, vocab, acc_dtype):
    step = _rows_per_chunk(vocab, acc_dtype)
    for begin in range(0, n_rows, step):
        yield slice(begin, min(begin + step, n_rows))


def _scaled(logits, rows, vocab, acc_dtype, inv_temperature):
    """`logits / T` for a chunk in the accumulation dtype; a view, not a copy, when nothing changes
    (callers only read it)."""
    chunk = logits[rows, :vocab].to(acc_dtype)
    return chunk if inv_temperature == 1.0 else chunk * inv_temperature


class WholeVocabulary:
    """The row reductions of the forward passes when these logits hold the whole vocabulary.
    `VocabParallel` overrides them with collectives, so one implementation serves both."""

    def label_vocab(self, width):
        """The vocabulary that labels index (chunking uses it too, so every slice cuts alike)."""
        return width

    def logsumexp(self, scaled):
        """`(max, log_sum)` per row (see `logsumexp_parts`)."""
        return logsumexp_parts(scaled)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        """HPD's column for `registry.STAT_TOP_S`: `y` or `y_hat`, whichever has q > 1/2 (only there
        can `w - q (w_y + w_hat)` cancel), else -1 (the Triton kernel's `hpd_pivot`)."""
        pivot = torch.where(log_q_y >= log_q_hat, labels, sampled_ids)
        return torch.where(torch.maximum(log_q_y, log_q_hat) > -math.log(2.0), pivot, torch.full_like(pivot, -1))

    def top_column(self, scaled):
        """The column whose gradient the backward derives from the others' (`registry.STAT_TOP_S`):
        the first argmax; -1 (none) where the whole row is not here."""
        return scaled.argmax(dim=-1).to(scaled.dtype) if scaled.shape[1] else scaled.new_full((scaled.shape[0],), -1.0)

    def row_sums(self, sums):
        return sums

    def sample(self, student, first_row, key, scale):
        return sample_gumbel_max(student, first_row, key, scale)

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature):
        return _gather(logits, rows, ids, acc_dtype, inv_temperature)


WHOLE = WholeVocabulary()


def divergence_forward(student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q, ignore_index,
                       vocabulary=WHOLE):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    inv_temperature = 1.0 / temperature
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, DIVERGENCE_STATS, dtype=acc_dtype, device=student.device)
    for rows in _chunks(n_rows, label_vocab, acc_dtype):
        s = _scaled(student, rows, vocab, acc_dtype, inv_temperature)
        t = _scaled(teacher, rows, vocab, acc_dtype, inv_temperature)
        (max_s, log_sum_s), (max_t, log_sum_t) = vocabulary.logsumexp(s), vocabulary.logsumexp(t)
        top_s = vocabulary.top_column(s)
        value, weight = divergence_terms(_log_softmax(s, max_s, log_sum_s), _log_softmax(t, max_t, log_sum_t),
                                         log_mix_p, log_mix_q, divergence)
        row_value, row_weight = vocabulary.row_sums(torch.stack([value.sum(-1), weight.sum(-1)], dim=1)).unbind(1)
        loss[rows] = _zero_unless(active[rows] & _defined(log_sum_s, log_sum_t), row_value)
        stats[rows] = torch.stack([max_s, log_sum_s, top_s, max_t, log_sum_t, row_weight], dim=1)
    return loss, stats


def divergence_backward(student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p, log_mix_q):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = stats.dtype
    inv_temperature = 1.0 / temperature
    for rows in _chunks(n_rows, vocab, acc_dtype):
        s = _scaled(student, rows, vocab, acc_dtype, inv_temperature)
        t = _scaled(teacher, rows, vocab, acc_dtype, inv_temperature)
        max_s, log_sum_s, top_s, max_t, log_sum_t, row_sum = stats[rows].unbind(1)
        log_q = _log_softmax(s, max_s, log_sum_s)
        _, weight = divergence_terms(log_q, _log_softmax(t, max_t, log_sum_t), log_mix_p, log_mix_q, divergence)
        scale = row_scale[rows].to(acc_dtype)
        chunk_grad = (-inv_temperature * scale)[:, None] * (weight - log_q.exp() * row_sum[:, None])
        # Inactive rows (scale 0) may hold NaN stats: select, do not multiply.
        live = (scale != 0) & _defined(log_sum_s, log_sum_t)
        grad[rows, :vocab] = _top_from_others(_zero_unless(live[:, None], chunk_grad), top_s).to(grad.dtype)
    grad[:, vocab:] = 0
    return grad


def _top_from_others(chunk_grad, top):
    """Each row's top column (`top >= 0`) gets minus the sum of its other columns: a softmax
    gradient sums to 0, and `w - q W` at q near 1 would cancel large terms. Where that sum is not
    finite (an infinite divergence) the column keeps its `w - q W` value (see the Triton twin)."""
    rows = torch.nonzero(top >= 0)[:, 0]
    columns = top[rows].long()
    top_formula = chunk_grad[rows, columns]
    chunk_grad[rows, columns] = 0
    from_others = -chunk_grad[rows].sum(-1)
    chunk_grad[rows, columns] = torch.where(from_others.isfinite(), from_others, top_formula)
    return chunk_grad


def gumbel_scores(student, scale, row_keys, columns):
    """The kernel's Gumbel-max scores in base 2, `s log2(e) / T + g2` (float32), rounded as it rounds them."""
    return gumbel2_torch(row_keys, columns).add_((student.to(scale.dtype) * scale).float())


def sample_gumbel_max(student, first_row, key, scale):
    """y_hat for rows `first_row...` of unscaled logits; `scale` is log2(e) / T as a tensor of the
    accumulation dtype (the kernel's)."""
    device = student.device
    row_ids = torch.arange(first_row, first_row + student.shape[0], device=device)
    scores = gumbel_scores(student, scale, row_keys_torch(key, row_ids), torch.arange(student.shape[1], device=device))
    return torch.argmax(scores, dim=-1)


def _gather(logits, rows, ids, acc_dtype, inv_temperature):
    return logits[rows].gather(1, ids[:, None])[:, 0].to(acc_dtype) * inv_temperature


def hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, label_ids, sampled_ids, fkl_weight, rkl_weight):
    """HPD's per-row `(loss, w_y, w_hat)` from the four log-probabilities of `y` and `y_hat`
    (the spec's weights; shared with the vocabulary-parallel implementation)."""
    q_y, q_hat = log_q_y.exp(), log_q_hat.exp()
    d_y = _zero_if(q_y == 0, q_y * (log_p_y - log_q_y))
    d_hat = _zero_if(q_hat == 0, q_hat * (log_p_hat - log_q_hat))
    under, over = d_y > 0, d_hat < 0
    w_y = rkl_weight * d_y + _zero_unless(under, fkl_weight * log_p_y.exp() * torch.where(over, 2.0, 1.0))
    w_hat = _zero_unless(over & (sampled_ids != label_ids), rkl_weight * d_hat)
    per_row = -(_zero_if(w_y == 0, w_y * log_q_y) + _zero_if(w_hat == 0, w_hat * log_q_hat))
    return per_row, w_y, w_hat


def hybrid_forward(student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight, ignore_index,
                   row_offset=0, vocabulary=WHOLE):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    inv_temperature = 1.0 / temperature
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    sample = sampled_ids is None
    key = seed_key(seed or 0)
    out_ids = torch.full((n_rows,), ignore_index, dtype=torch.int64, device=student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, HYBRID_STATS, dtype=acc_dtype, device=student.device)
    gather = vocabulary.gather
    # The kernel's score scale, rounded as it rounds it, so both backends draw the same tokens.
    scale = torch.tensor(temperature_scalars(temperature, acc_dtype)[0], dtype=acc_dtype, device=student.device)
    for rows in _chunks(n_rows, label_vocab, acc_dtype):
        live = active[rows]
        max_s, log_sum_s = vocabulary.logsumexp(_scaled(student, rows, vocab, acc_dtype, inv_temperature))
        max_t, log_sum_t = vocabulary.logsumexp(_scaled(teacher, rows, vocab, acc_dtype, inv_temperature))
        if sample:
            chunk_ids = vocabulary.sample(student[rows, :vocab], row_offset + rows.start, key, scale)
        else:
            chunk_ids = sampled_ids[rows]
        safe_y = torch.where(live, labels[rows], 0)
        safe_hat = torch.where(live, chunk_ids, 0)
        log_q_y = (gather(student, rows, safe_y, acc_dtype, inv_temperature) - max_s) - log_sum_s
        log_p_y = (gather(teacher, rows, safe_y, acc_dtype, inv_temperature) - max_t) - log_sum_t
        log_q_hat = (gather(student, rows, safe_hat, acc_dtype, inv_temperature) - max_s) - log_sum_s
        log_p_hat = (gather(teacher, rows, safe_hat, acc_dtype, inv_temperature) - max_t) - log_sum_t
        per_row, w_y, w_hat = hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, safe_y, safe_hat, fkl_weight,
                                            rkl_weight)
        defined = live & _defined(log_sum_s, log_sum_t)
        loss[rows] = _zero_unless(defined, per_row)
        pivot = vocabulary.hpd_pivot(log_q_y, log_q_hat, safe_y, safe_hat).to(acc_dtype)
        # A row whose teacher has no distribution is marked as the student's would be (log_sum -inf):
        # the backward then leaves it out, hard-label term included.
        marked = torch.where(log_sum_t != -math.inf, log_sum_s, -math.inf)
        stats[rows] = torch.stack([max_s, marked, pivot, _zero_unless(defined, w_y), _zero_unless(defined, w_hat)],
                                  dim=1)
        out_ids[rows] = torch.where(live, chunk_ids, out_ids[rows])
    return loss, stats, (out_ids if sample else sampled_ids)


def label_log_probs(student, labels, stats, temperature):
    """`log q(y)` per row (natural units) from a forward's stats (the max and log-sum of the scaled
    logits): one gather, no vocabulary pass. Rows with `labels` outside `[0, V_s)` read column 0
    (the caller masks them)."""
    safe = torch.where((labels >= 0) & (labels < student.shape[1]), labels, 0)
    logits = student.gather(1, safe[:, None])[:, 0].to(stats.dtype) * (1.0 / temperature)
    return (logits - stats[:, STAT_MAX_S]) - stats[:, STAT_LOG_SUM_S]


def hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature, to_local=None):
    """`to_local(ids) -> (owned, column)` maps token ids to this tensor's columns (a vocabulary
    slice, for the vocabulary-parallel implementation); by default every id is a column."""
    n_rows = student.shape[0]
    acc_dtype = stats.dtype
    inv_temperature = 1.0 / temperature
    for rows in _chunks(n_rows, vocab, acc_dtype):
        scale = row_scale[rows].to(acc_dtype)
        max_s, log_sum_s, top_s, w_y, w_hat = stats[rows].unbind(1)
        live = (scale != 0) & _defined(log_sum_s)
        q = _log_softmax(_scaled(student, rows, vocab, acc_dtype, inv_temperature), max_s, log_sum_s).exp()
        chunk_grad = -q * (w_y + w_hat)[:, None]
        index = torch.arange(rows.stop - rows.start, device=student.device)
        for ids, weight in ((labels[rows], w_y), (sampled_ids[rows], w_hat)):
            ids = torch.where(live, ids, 0)
            owned, column = (live, ids) if to_local is None else to_local(ids)
            chunk_grad[index, column] += _zero_unless(owned & live, weight)
        chunk_grad = (-inv_temperature * scale)[:, None] * chunk_grad
        grad[rows, :vocab] = _top_from_others(_zero_unless(live[:, None], chunk_grad), top_s).to(grad.dtype)
    grad[:, vocab:] = 0
    return grad
