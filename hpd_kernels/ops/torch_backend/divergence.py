"""The torch backend's full-vocabulary divergences (the twin of `ops/triton/divergence.py`): per-token
terms, each chunk's forward and backward as plain functions (run compiled or eagerly, see
`compile_policy`), and the forward and backward over a call's rows (`row_spans`), with the row
reductions of its `vocabulary`."""

from __future__ import annotations

import math

import torch

from ...registry import DIVERGENCE_STATS, IDENTITY_MAPS, STAT_TOP_S, accumulation_dtype
from ..backend_contract import DivergenceForward
from ..common import active_rows, map_slope
from .compile_policy import CompiledChunkMath, use_compiled_math
from .row_math import (chunk_parameters, defined_rows, entropy_sums, log_softmax, scale_chunk, scaled_rows,
                       side_maps, top_from_others, whole_row_logsumexp, write_gradient, zero_if, zero_unless)
from .row_spans import forward_spans, live_spans, span_chunks, zero_outside
from .vocabulary import Vocabulary


def _logaddexp(a, b):
    larger = torch.maximum(a, b)
    reference = torch.where(larger == -math.inf, torch.zeros_like(larger), larger)
    return reference + torch.log(torch.exp(a - reference) + torch.exp(b - reference))


def _mixture_weight(log_mix):
    return math.exp(log_mix) if isinstance(log_mix, (int, float)) else log_mix.exp()


def divergence_terms(log_q, log_p, log_mix_p, log_mix_q, divergence):
    """Per-token value and weight `w` of one divergence (mirror of the Triton `divergence_terms`).
    The log mixture weights are Python floats or 0-d tensors (the compiled chunks' parameters)."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        value = zero_if(p == 0, p * (log_p - log_q))
        return value, p
    if divergence == "reverse_kl":
        value = zero_if(q == 0, q * (log_q - log_p))
        return value, -value
    if divergence == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(p - q)
    log_m = _logaddexp(log_mix_p + log_p, log_mix_q + log_q)
    if divergence == "jsd":
        mix_p, mix_q = _mixture_weight(log_mix_p), _mixture_weight(log_mix_q)
        value = (mix_p * zero_if(p == 0, p * (log_p - log_m))
                 + mix_q * zero_if(q == 0, q * (log_q - log_m)))
        weight = mix_q * zero_if(q == 0, q * (log_m - log_q))
    elif divergence == "skew_forward_kl":
        value = zero_if(p == 0, p * (log_p - log_m))
        # p * (q / m), the ratio from logs: it stays O(1) where q alone underflows to 0 (alpha -> 0).
        weight = zero_if((log_p == -math.inf) | (log_q == -math.inf), p * torch.exp(log_mix_q + log_q - log_m))
    elif divergence == "skew_reverse_kl":
        value = zero_if(q == 0, q * (log_q - log_m))
        weight = zero_if(q == 0, q * (log_m - log_q + torch.exp(log_mix_q + log_q - log_m)))
    else:
        raise ValueError(divergence)
    return value, weight


def _divergence_chunk_forward(student, teacher, params, divergence: str, maps=(None, None), with_entropy=False):
    """The whole forward of a chunk whose rows hold the whole vocabulary: row value, row weight and
    the stats `max_s, log_sum_s, max_t, log_sum_t` (then the student's entropy, `with_entropy`),
    each side mapped by `maps` (`row_math.side_maps`) (compiled: a few fused row loops)."""
    acc_dtype = accumulation_dtype(student.dtype)
    s, t = scale_chunk(student, acc_dtype, params[0], maps[0]), scale_chunk(teacher, acc_dtype, params[0], maps[1])
    max_s, log_sum_s, _ = whole_row_logsumexp(s)
    max_t, log_sum_t, _ = whole_row_logsumexp(t)
    log_q = log_softmax(s, max_s, log_sum_s)
    value, weight = divergence_terms(log_q, log_softmax(t, max_t, log_sum_t), params[1], params[2], divergence)
    results = (value.sum(-1), weight.sum(-1), max_s, log_sum_s, max_t, log_sum_t)
    return results + (entropy_sums(log_q),) if with_entropy else results


def _divergence_chunk_terms(s, t, max_s, log_sum_s, max_t, log_sum_t, params, divergence: str, with_entropy=False):
    """`[rows, 2]` sums of a chunk's values and weights over its columns, given the row stats (the
    elementwise part between a vocabulary slice's collectives; compiled); `with_entropy`: `[rows, 3]`,
    the student's entropy's partial sums third."""
    log_q = log_softmax(s, max_s, log_sum_s)
    value, weight = divergence_terms(log_q, log_softmax(t, max_t, log_sum_t), params[1], params[2], divergence)
    sums = [value.sum(-1), weight.sum(-1)] + ([entropy_sums(log_q)] if with_entropy else [])
    return torch.stack(sums, dim=1)


def _divergence_chunk_backward(out, student, teacher, stats, scale, params, divergence: str, has_top: bool,
                               maps=(None, None)):
    """A chunk's gradient `-(scale / T) (w - q W)`, times the student map's slope (compiled: one or
    two fused row loops). The slope is read from the raw chunk before `out` (maybe it) is written."""
    acc_dtype = stats.dtype
    s, t = scale_chunk(student, acc_dtype, params[0], maps[0]), scale_chunk(teacher, acc_dtype, params[0], maps[1])
    slope = None if maps[0] is None else map_slope(student.to(acc_dtype), *maps[0])
    max_s, log_sum_s, top_s, max_t, log_sum_t, row_sum = stats.unbind(1)
    log_q = log_softmax(s, max_s, log_sum_s)
    _, weight = divergence_terms(log_q, log_softmax(t, max_t, log_sum_t), params[1], params[2], divergence)
    chunk_grad = (-params[0].to(acc_dtype) * scale)[:, None] * (weight - log_q.exp() * row_sum[:, None])
    # Inactive rows (scale 0) may hold NaN stats: select, do not multiply.
    live = (scale != 0) & defined_rows(log_sum_s, log_sum_t)
    return write_gradient(out, chunk_grad, live, top_s, has_top, slope)


_compiled_divergence_forward = CompiledChunkMath(_divergence_chunk_forward)
_compiled_divergence_terms = CompiledChunkMath(_divergence_chunk_terms)
_compiled_divergence_backward = CompiledChunkMath(_divergence_chunk_backward)


def divergence_forward(student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q, ignore_index,
                       vocabulary: Vocabulary, logit_maps=IDENTITY_MAPS, with_entropy=False) -> DivergenceForward:
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, DIVERGENCE_STATS, dtype=acc_dtype, device=student.device)
    entropy = torch.zeros(n_rows, dtype=acc_dtype, device=student.device) if with_entropy else None
    params = chunk_parameters(temperature, log_mix_p, log_mix_q)
    maps = side_maps(logit_maps)
    fast = use_compiled_math(n_rows, vocab)
    spans = forward_spans(vocabulary, active, stats)
    for rows in span_chunks(spans, label_vocab, acc_dtype, compiled=fast and vocabulary.local_rows):
        parts = _chunk_forward(student, teacher, rows, vocab, params, divergence, maps, with_entropy, fast,
                               vocabulary)
        row_value, row_weight, max_s, log_sum_s, max_t, log_sum_t = parts[:6]
        top_s = vocabulary.top_column(student[rows, :vocab], log_sum_s, params[0], maps[0])
        counted = active[rows] & defined_rows(log_sum_s, log_sum_t)
        loss[rows] = zero_unless(counted, row_value)
        if with_entropy:
            entropy[rows] = zero_unless(counted, parts[6])
        stats[rows] = torch.stack([max_s, log_sum_s, top_s, max_t, log_sum_t, row_weight], dim=1)
    return DivergenceForward(loss, stats, entropy)


def _chunk_forward(student, teacher, rows, vocab, params, divergence, maps, with_entropy, fast, vocabulary):
    """A chunk's `(row value, row weight, max_s, log_sum_s, max_t, log_sum_t[, entropy])`: one
    compiled function where the rows are local, else the collectives around the compiled terms."""
    if vocabulary.local_rows:
        return _compiled_divergence_forward(fast, student[rows, :vocab], teacher[rows, :vocab], params, divergence,
                                            maps, with_entropy)
    acc_dtype, inv_temperature = accumulation_dtype(student.dtype), params[0].item()
    s = scaled_rows(student, rows, vocab, acc_dtype, inv_temperature, maps[0])
    t = scaled_rows(teacher, rows, vocab, acc_dtype, inv_temperature, maps[1])
    (max_s, log_sum_s), (max_t, log_sum_t) = vocabulary.logsumexp(s), vocabulary.logsumexp(t)
    sums = _compiled_divergence_terms(fast, s, t, max_s, log_sum_s, max_t, log_sum_t, params, divergence,
                                      with_entropy)
    sums = vocabulary.row_sums(sums).unbind(1)
    return (sums[0], sums[1], max_s, log_sum_s, max_t, log_sum_t) + tuple(sums[2:])


def divergence_backward(student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p, log_mix_q,
                        logit_maps=IDENTITY_MAPS):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = stats.dtype
    params = chunk_parameters(temperature, log_mix_p, log_mix_q)
    maps = side_maps(logit_maps)
    has_top = bool(n_rows) and bool((stats[:, STAT_TOP_S] >= 0).any())
    fast = use_compiled_math(n_rows, vocab)
    spans = live_spans(row_scale != 0)
    for rows in span_chunks(spans, vocab, acc_dtype, compiled=fast):
        out = grad[rows, :vocab]
        sums = _compiled_divergence_backward(fast, out, student[rows, :vocab], teacher[rows, :vocab], stats[rows],
                                             row_scale[rows].to(acc_dtype), params, divergence, has_top, maps)
        top_from_others(out, stats[rows, STAT_TOP_S], sums)
    zero_outside(grad, spans)
    grad[:, vocab:] = 0
    return grad
