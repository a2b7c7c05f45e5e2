"""The torch backend's HPD (the twin of `ops/triton/hybrid.py`): the forward gathers the four
log-probabilities of `y` and `y_hat` per row after its log-sum-exps (drawing `y_hat` with the
kernel's noise, `sampling.py`), and the backward writes
`-(scale / T) (w_y [v = y] + w_hat [v = y_hat] - q (w_y + w_hat))` chunk by chunk."""

from __future__ import annotations

import math

import torch

from ...registry import HYBRID_STATS, IDENTITY_MAPS, STAT_TOP_S, accumulation_dtype
from ..backend_contract import HybridForward
from ..common import active_rows, map_logits, map_slope, temperature_scalars
from ..gumbel import seed_key
from .compile_policy import CompiledChunkMath, use_compiled_math
from .row_math import (chunk_parameters, defined_rows, entropy_sums, log_softmax, scale_chunk, scaled_rows,
                       side_maps, top_from_others, whole_row_logsumexp, write_gradient, zero_if, zero_unless)
from .row_spans import forward_spans, live_spans, span_chunks, zero_outside
from .vocabulary import Vocabulary


def _hybrid_chunk_backward(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y, column_hat,
                           add_hat, params, has_top: bool, logit_map=None):
    """A chunk's HPD gradient: `-(scale / T) (w_y [v = y] + w_hat [v = y_hat] - q (w_y + w_hat))`
    (compiled: the label and sample columns as comparisons, no scatter), times the slope of the
    student's `logit_map` (`row_math.side_maps`), read from the raw chunk before `out` (maybe it) is
    written."""
    acc_dtype = max_s.dtype
    live = (scale != 0) & defined_rows(log_sum_s)
    if not torch.compiler.is_compiling() and out.dtype == acc_dtype and logit_map is None:
        return _hybrid_chunk_backward_eager(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y,
                                            column_hat, add_hat, params, has_top, live)
    slope = None if logit_map is None else map_slope(student.to(acc_dtype), *logit_map)
    q = log_softmax(scale_chunk(student, acc_dtype, params[0], logit_map), max_s, log_sum_s).exp()
    chunk_grad = -q * (w_y + w_hat)[:, None]
    columns = torch.arange(student.shape[1], device=student.device)[None, :]
    chunk_grad = chunk_grad + zero_unless(columns == column_y[:, None], add_y[:, None])
    chunk_grad = chunk_grad + zero_unless(columns == column_hat[:, None], add_hat[:, None])
    chunk_grad = (-params[0].to(acc_dtype) * scale)[:, None] * chunk_grad
    return write_gradient(out, chunk_grad, live, top_s, has_top, slope)


def _hybrid_chunk_backward_eager(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y,
                                 column_hat, add_hat, params, has_top, live):
    """`_hybrid_chunk_backward` as eager PyTorch runs it fastest: the same math, computed in place in
    `out` (which may be `student` itself: every step reads an element before writing it) in five
    passes and no temporaries, the two label columns as scatters instead of comparisons over whole
    rows; only the order in which a row's scalar factors are multiplied differs (one rounding). For
    `out` in the accumulation dtype."""
    coefficient = -params[0].to(out.dtype) * scale
    if params[0].item() == 1.0:
        torch.sub(student, max_s[:, None], out=out)
    else:
        torch.mul(student, params[0].to(out.dtype), out=out).sub_(max_s[:, None])
    out.sub_(log_sum_s[:, None]).exp_().mul_((coefficient * -(w_y + w_hat))[:, None])
    rows = torch.arange(out.shape[0], device=out.device)
    for column, add in ((column_y, add_y), (column_hat, add_hat)):
        out.index_put_((rows, column), coefficient * add, accumulate=True)
    dead = torch.nonzero(~live)[:, 0]
    if dead.numel():
        out.index_fill_(0, dead, 0.0)
    if not has_top:
        return None
    at_top = out.gather(1, top_s.clamp(min=0).to(torch.int64)[:, None])[:, 0]
    return torch.stack([out.sum(-1), torch.where(top_s >= 0, at_top, 0.0)], dim=1)


def _logsumexp_pair(student, teacher, params, maps=(None, None), with_entropy=False):
    """`[rows, 4]`: `max_s, log_sum_s, max_t, log_sum_t` of a chunk of whole rows, each side mapped by
    `maps` (`row_math.side_maps`); `with_entropy`: `[rows, 5]`, the student's entropy last (compiled)."""
    acc_dtype = accumulation_dtype(student.dtype)
    s = scale_chunk(student, acc_dtype, params[0], maps[0])
    max_s, log_sum_s, _ = whole_row_logsumexp(s)
    max_t, log_sum_t, _ = whole_row_logsumexp(scale_chunk(teacher, acc_dtype, params[0], maps[1]))
    entropy = [entropy_sums(log_softmax(s, max_s, log_sum_s))] if with_entropy else []
    return torch.stack([max_s, log_sum_s, max_t, log_sum_t] + entropy, dim=1)

_compiled_hybrid_backward = CompiledChunkMath(_hybrid_chunk_backward)
_compiled_logsumexp_pair = CompiledChunkMath(_logsumexp_pair)


def hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, label_ids, sampled_ids, fkl_weight, rkl_weight):
    """HPD's per-row `(loss, w_y, w_hat)` from the four log-probabilities of `y` and `y_hat`
    (the spec's weights)."""
    q_y, q_hat = log_q_y.exp(), log_q_hat.exp()
    d_y = zero_if(q_y == 0, q_y * (log_p_y - log_q_y))
    d_hat = zero_if(q_hat == 0, q_hat * (log_p_hat - log_q_hat))
    under, over = d_y > 0, d_hat < 0
    w_y = rkl_weight * d_y + zero_unless(under, fkl_weight * log_p_y.exp() * torch.where(over, 2.0, 1.0))
    w_hat = zero_unless(over & (sampled_ids != label_ids), rkl_weight * d_hat)
    per_row = -(zero_if(w_y == 0, w_y * log_q_y) + zero_if(w_hat == 0, w_hat * log_q_hat))
    return per_row, w_y, w_hat


def hybrid_forward(student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight, ignore_index,
                   row_ids=None, vocabulary: Vocabulary, logit_maps=IDENTITY_MAPS, with_entropy=False) -> HybridForward:
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    inv_temperature = 1.0 / temperature
    maps = side_maps(logit_maps)
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    sample = sampled_ids is None
    if sample and row_ids is None:
        row_ids = torch.arange(n_rows, device=student.device)
    key = seed_key(seed or 0)
    out_ids = torch.full((n_rows,), ignore_index, dtype=torch.int64, device=student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, HYBRID_STATS, dtype=acc_dtype, device=student.device)
    entropy = torch.zeros(n_rows, dtype=acc_dtype, device=student.device) if with_entropy else None
    gather = vocabulary.gather
    # The kernel's score scale, rounded as it rounds it, so both backends draw the same tokens.
    scale = torch.tensor(temperature_scalars(temperature, acc_dtype)[0], dtype=acc_dtype, device=student.device)
    fast = use_compiled_math(n_rows, vocab) and vocabulary.local_rows
    spans = forward_spans(vocabulary, active, stats)
    if fast:  # every row's log-sum-exps first, in the larger compiled chunks
        parts = torch.empty(n_rows, 5 if with_entropy else 4, dtype=acc_dtype, device=student.device)
        params = chunk_parameters(temperature)
        for rows in span_chunks(spans, label_vocab, acc_dtype, compiled=True):
            parts[rows] = _compiled_logsumexp_pair(fast, student[rows, :vocab], teacher[rows, :vocab], params, maps,
                                                   with_entropy)
    # Drawing y_hat keeps several [rows, V] temporaries (the noise's integer hashing): standard chunks.
    for rows in span_chunks(spans, label_vocab, acc_dtype, compiled=fast and not sample):
        live = active[rows]
        if fast:
            max_s, log_sum_s, max_t, log_sum_t, *row_entropy = parts[rows].unbind(1)
        else:
            max_s, log_sum_s, max_t, log_sum_t, *row_entropy = _row_logsumexps(
                student, teacher, rows, vocab, inv_temperature, maps, with_entropy, vocabulary)
        if sample:
            chunk_ids = vocabulary.sample(_sampled_logits(student[rows, :vocab], acc_dtype, maps[0]), row_ids[rows],
                                          key, scale)
        else:
            chunk_ids = sampled_ids[rows]
        safe_y = torch.where(live, labels[rows], 0)
        safe_hat = torch.where(live, chunk_ids, 0)
        log_q_y = (gather(student, rows, safe_y, acc_dtype, inv_temperature, maps[0]) - max_s) - log_sum_s
        log_p_y = (gather(teacher, rows, safe_y, acc_dtype, inv_temperature, maps[1]) - max_t) - log_sum_t
        log_q_hat = (gather(student, rows, safe_hat, acc_dtype, inv_temperature, maps[0]) - max_s) - log_sum_s
        log_p_hat = (gather(teacher, rows, safe_hat, acc_dtype, inv_temperature, maps[1]) - max_t) - log_sum_t
        per_row, w_y, w_hat = hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, safe_y, safe_hat, fkl_weight,
                                            rkl_weight)
        defined = live & defined_rows(log_sum_s, log_sum_t)
        loss[rows] = zero_unless(defined, per_row)
        if with_entropy:
            entropy[rows] = zero_unless(defined, row_entropy[0])
        pivot = vocabulary.hpd_pivot(log_q_y, log_q_hat, safe_y, safe_hat).to(acc_dtype)
        # A row whose teacher has no distribution is marked as the student's would be (log_sum -inf):
        # the backward then leaves it out, hard-label term included.
        marked = torch.where(log_sum_t != -math.inf, log_sum_s, -math.inf)
        stats[rows] = torch.stack([max_s, marked, pivot, zero_unless(defined, w_y), zero_unless(defined, w_hat)],
                                  dim=1)
        out_ids[rows] = torch.where(live, chunk_ids, out_ids[rows])
    return HybridForward(loss, stats, out_ids if sample else sampled_ids, entropy)


def _row_logsumexps(student, teacher, rows, vocab, inv_temperature, maps, with_entropy, vocabulary):
    """`(max_s, log_sum_s, max_t, log_sum_t[, entropy])` of a chunk, eagerly, through `vocabulary`'s
    reductions (the entropy's partial sums from the same mapped chunk, summed over slices)."""
    acc_dtype = accumulation_dtype(student.dtype)
    s = scaled_rows(student, rows, vocab, acc_dtype, inv_temperature, maps[0])
    max_s, log_sum_s = vocabulary.logsumexp(s)
    max_t, log_sum_t = vocabulary.logsumexp(scaled_rows(teacher, rows, vocab, acc_dtype, inv_temperature, maps[1]))
    if not with_entropy:
        return max_s, log_sum_s, max_t, log_sum_t
    return max_s, log_sum_s, max_t, log_sum_t, vocabulary.row_sums(entropy_sums(log_softmax(s, max_s, log_sum_s)))


def _sampled_logits(student, acc_dtype, logit_map):
    """The logits HPD's draw reads: the raw chunk, or the mapped one (in the accumulation dtype)."""
    return student if logit_map is None else map_logits(student.to(acc_dtype), *logit_map)


def hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature,
                    vocabulary: Vocabulary, logit_maps=IDENTITY_MAPS):
    """`vocabulary.local_columns` maps token ids to this tensor's columns (a slice's own, under
    vocabulary parallelism; every id is a column of the whole vocabulary)."""
    n_rows = student.shape[0]
    acc_dtype = stats.dtype
    inv_temperature = 1.0 / temperature
    params = chunk_parameters(temperature)
    has_top = bool(n_rows) and bool((stats[:, STAT_TOP_S] >= 0).any())
    fast = use_compiled_math(n_rows, vocab)
    spans = live_spans(row_scale != 0)
    for rows in span_chunks(spans, vocab, acc_dtype, compiled=fast):
        scale = row_scale[rows].to(acc_dtype)
        max_s, log_sum_s, top_s, w_y, w_hat = stats[rows].unbind(1)
        live = (scale != 0) & defined_rows(log_sum_s)
        columns = []
        for ids, weight in ((labels[rows], w_y), (sampled_ids[rows], w_hat)):
            ids = torch.where(live, ids, 0)
            owned, column = vocabulary.local_columns(ids, student.shape[1])
            columns += [column, zero_unless(owned & live, weight)]
        out = grad[rows, :vocab]
        sums = _compiled_hybrid_backward(fast, out, student[rows, :vocab], max_s, log_sum_s, top_s, w_y, w_hat, scale,
                                         *columns, params, has_top, side_maps(logit_maps)[0])
        top_from_others(out, top_s, sums)
    zero_outside(grad, spans)
    grad[:, vocab:] = 0
    return grad
