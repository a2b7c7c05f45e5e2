"""The row math the torch backend's divergences and HPD share: log-sum-exps kept as `(max, log_sum)`,
log-softmaxes, the chunk scalars, and the gradient's top column taken from the others' sum.
Each is the twin of a Triton helper (`ops/triton/utils.py`, `divergence.py`), rounding as it may."""

from __future__ import annotations

import math

import torch

from ..common import map_logits


def side_maps(logit_maps):
    """`(student, teacher)`: each side's map as `(scale, softcap)`, or None for the identity (whose
    code path then stays the one from before the maps existed)."""
    student = None if logit_maps.student_is_identity else (logit_maps.student_scale, logit_maps.student_softcap)
    teacher = None if logit_maps.teacher_is_identity else (logit_maps.teacher_scale, logit_maps.teacher_softcap)
    return student, teacher


def zero_unless(condition, value):
    return torch.where(condition, value, torch.zeros_like(value))


def zero_if(condition, value):
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


def defined_rows(*row_log_sums):
    """Rows with a distribution on every side: a row whose logits are all `-inf` has
    `log_sum = -inf` and no softmax; it contributes 0 and gets no gradient. (A `+inf` logit's NaN
    is not `-inf`: it stays NaN.)"""
    defined = row_log_sums[0] != -math.inf
    for log_sum in row_log_sums[1:]:
        defined = defined & (log_sum != -math.inf)
    return defined


def log_softmax(scaled_logits, row_max, row_log_sum):
    """The maximum first, as `log_softmax` does: no digits lost to a large `max`."""
    return (scaled_logits - row_max[:, None]) - row_log_sum[:, None]


def chunk_parameters(temperature, log_mix_p=0.0, log_mix_q=0.0):
    """A compiled chunk's scalars as one float64 tensor `[1 / T, log_mix_p, log_mix_q]`: tensors, so
    that a new temperature or mixture weight reuses the compiled code."""
    return torch.tensor([1.0 / temperature, log_mix_p, log_mix_q], dtype=torch.float64)


def scale_chunk(chunk, acc_dtype, inv_temperature, logit_map=None):
    """`chunk / T` in the accumulation dtype; `inv_temperature` a 0-d tensor; `logit_map` (`side_maps`)
    maps the logits first."""
    if logit_map is None:
        return chunk.to(acc_dtype) * inv_temperature.to(acc_dtype)
    return map_logits(chunk.to(acc_dtype), *logit_map) * inv_temperature.to(acc_dtype)


def entropy_sums(log_q):
    """`-sum q log q` over a chunk's columns per row (`0 log 0 = 0`; a whole row, or a slice's part)."""
    return -zero_if(log_q == -math.inf, log_q.exp() * log_q).sum(-1)


def whole_row_logsumexp(scaled):
    """`logsumexp_parts` of whole rows, written so that inductor fuses it (no selection between the
    max and the sum): `(max, log_sum, raw max)`, the same numbers (a row of `-inf`: `x - max` is
    NaN, its sum's log replaced by `-inf`; a `+inf` logit: NaN, as there)."""
    raw_max = scaled.amax(dim=-1)
    log_sum = (scaled - raw_max[:, None]).exp().sum(-1).log()
    empty = raw_max == -math.inf
    return zero_if(empty, raw_max), torch.where(empty, torch.full_like(log_sum, -math.inf), log_sum), raw_max


def write_gradient(out, chunk_grad, live, top, has_top: bool, slope=None):
    """Write the gradient of the live rows into `out` (zeros elsewhere) and return, where `has_top`,
    each row's sum over all its columns and its value at its top column (`top >= 0`), both in the
    accumulation dtype, for `top_from_others`: comparisons and one fused loop, no scatter.
    `slope` (a student map's `map_slope` at the raw logits, read before `out`, which may be them,
    is written): `chunk_grad` is the gradient wrt the mapped logits, `out` gets it times `slope`;
    the sums stay those of `chunk_grad` (they sum to 0 there, not after the chain rule), with the
    slope at the top column as a third column."""
    chunk_grad = zero_unless(live[:, None], chunk_grad)
    out.copy_(chunk_grad if slope is None else zero_unless(live[:, None], chunk_grad * slope))
    if not has_top:
        return None
    columns = torch.arange(chunk_grad.shape[1], device=chunk_grad.device)
    is_top = columns[None, :] == top.to(torch.int64)[:, None]
    sums = [chunk_grad.sum(-1), zero_unless(is_top, chunk_grad).sum(-1)]
    if slope is not None:
        sums.append(zero_unless(is_top, slope).sum(-1))
    return torch.stack(sums, dim=1)


def top_from_others(out, top, sums):
    """Each row's top column (`top >= 0`) gets minus the sum of its other columns: a softmax
    gradient sums to 0, and `w - q W` at q near 1 would cancel large terms (the other columns are
    small there, so `row sum - top value` loses none of their digits). Where that sum is not finite
    (an infinite divergence) the column keeps its `w - q W` value (see the Triton twin). A third
    column of `sums` (`write_gradient`'s `slope`) multiplies the result: the chain rule after the sum rule."""
    if sums is None:
        return
    rows = torch.nonzero(top >= 0)[:, 0]
    columns = top[rows].long()
    parts = sums[rows].unbind(1)
    row_sum, top_formula = parts[0], parts[1]
    from_others = -(row_sum - top_formula)
    value = torch.where(from_others.isfinite(), from_others, top_formula)
    out[rows, columns] = (value if len(parts) == 2 else value * parts[2]).to(out.dtype)


def scaled_rows(logits, rows, vocab, acc_dtype, inv_temperature, logit_map=None):
    """`logits / T` (mapped first by `logit_map`, `side_maps`) for a chunk in the accumulation dtype;
    a view, not a copy, when nothing changes (callers only read it)."""
    chunk = logits[rows, :vocab].to(acc_dtype)
    if logit_map is not None:
        chunk = map_logits(chunk, *logit_map)
    return chunk if inv_temperature == 1.0 else chunk * inv_temperature


def gathered_logits(logits, ids, acc_dtype, inv_temperature, logit_map=None):
    """`logits[row, ids[row]] / T` per row in the accumulation dtype, mapped first by `logit_map`."""
    values = logits.gather(1, ids[:, None])[:, 0].to(acc_dtype)
    return (values if logit_map is None else map_logits(values, *logit_map)) * inv_temperature
