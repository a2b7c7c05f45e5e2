"""Streaming Triton kernels for the full-vocabulary divergences: forward KL, reverse KL,
generalized JSD, skew forward/reverse KL and total variation.

Every objective is a reweighted log-likelihood (spec, "The unified view"): with per-token weights
`w(v)` and their row sum `W`, the gradient with respect to the student's logits is

    dL/ds[j] = -(row_scale / T) * (w(j) - q(j) * W)

so one forward kernel computes, per row, the two log-sum-exps, the loss and `W`, and one backward
kernel recomputes `w(j)` tile by tile and writes the gradient. Nothing of size `[N, V]` is
allocated but the gradient itself (and that one can be the student's logits, overwritten in place).

Passes over the vocabulary, per row:
- forward KL and reverse KL: 1 in the forward (their value and `W` accumulate online against the
  running max, like the log-sum-exp itself), 1 in the backward;
- JSD, skew KL, TVD: 2 in the forward (the mixture needs both log-sum-exps before any term), 1 in
  the backward.
"""

from __future__ import annotations

import math

import torch

from ...registry import (DIVERGENCE_CODES, DIVERGENCE_STATS, IDENTITY_MAPS, STAT_LOG_SUM_S, STAT_LOG_SUM_T, STAT_MAX_S,
                        STAT_MAX_T, STAT_ROW_WEIGHT, STAT_TOP_S, accumulation_dtype)
from ..backend_contract import DivergenceForward
from ..common import temperature_scalars
from .maps import load_map, map_codes, map_scalars, mapped, mapped_with_slope
from .utils import (HAS_TRITON, LN2, LOG2E, entropy_step, fast_log2, finish_logsumexp, first_argmax, kernel_scalars,
                    lane_argmax_step, launch_shape, log2_softmax, online_logsumexp_step, row_reference,
                    store_top_column, tl, top_column_step, triton)

# The kernels' DIVERGENCE constexpr, one named constant per registry code (constexpr objects are
# the only globals a kernel may read).
FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL, TVD = (
    tl.constexpr(DIVERGENCE_CODES[name]) if HAS_TRITON else DIVERGENCE_CODES[name] for name in
    ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"))
# The registry's stats columns, likewise.
_MAX_S, _LOG_SUM_S, _TOP_S, _MAX_T, _LOG_SUM_T, _ROW_WEIGHT, _STATS = (
    tl.constexpr(column) if HAS_TRITON else column for column in
    (STAT_MAX_S, STAT_LOG_SUM_S, STAT_TOP_S, STAT_MAX_T, STAT_LOG_SUM_T, STAT_ROW_WEIGHT, DIVERGENCE_STATS))


if HAS_TRITON:

    @triton.jit
    def _zero_unless(condition, value):
        return tl.where(condition, value, 0.0)

    @triton.jit
    def _zero_if(condition, value):
        # The spec's 0 * log 0 = 0: select, never multiply, so that 0 * inf cannot leak a NaN.
        # Conditions test `== 0`, never `> 0`, so that a NaN probability stays NaN (never a silent 0).
        return tl.where(condition, 0.0, value)

    @triton.jit
    def _log2_mixture(p, q, log2_p, log2_q, mix_p, mix_q, log2_mix_p, log2_mix_q):
        # log2(mix_p p + mix_q q): the hardware lg2 of the sum, bounded below by its larger term's
        # log, which is exact enough (within one bit) where the sum underflows and keeps p q / m finite.
        # (A NaN probability must stay NaN: the maximum propagates it.)
        return tl.maximum(fast_log2(mix_p * p + mix_q * q),
                          tl.maximum(log2_mix_p + log2_p, log2_mix_q + log2_q), propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def divergence_terms(log2_q, log2_p, mix_p, mix_q, log2_mix_p, log2_mix_q, DIVERGENCE: tl.constexpr):
        """Per-token value and weight `w` (natural units) of one divergence, from the two base-2
        log-softmaxes; the mixture is `m = mix_p p + mix_q q`."""
        q = tl.exp2(log2_q)
        p = tl.exp2(log2_p)
        if DIVERGENCE == FORWARD_KL:
            value = LN2 * _zero_if(p == 0, p * (log2_p - log2_q))
            weight = p
        elif DIVERGENCE == REVERSE_KL:
            value = LN2 * _zero_if(q == 0, q * (log2_q - log2_p))
            weight = -value
        elif DIVERGENCE == TVD:
            value = 0.5 * tl.abs(p - q)
            weight = 0.5 * q * tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        else:
            log2_m = _log2_mixture(p, q, log2_p, log2_q, mix_p, mix_q, log2_mix_p, log2_mix_q)
            q_term = _zero_if(q == 0, q * (log2_q - log2_m))
            if DIVERGENCE == JSD:
                value = LN2 * (mix_p * _zero_if(p == 0, p * (log2_p - log2_m)) + mix_q * q_term)
                weight = -LN2 * mix_q * q_term
            elif DIVERGENCE == SKEW_FORWARD_KL:
                value = LN2 * _zero_if(p == 0, p * (log2_p - log2_m))
                # p * (mix_q q / m), the ratio from logs: it stays O(1) where q alone underflows to 0
                # (alpha -> 0); p outside the exponent keeps its digits where log p is large.
                weight = _zero_if((log2_p == float("-inf")) | (log2_q == float("-inf")),
                                  p * tl.exp2(log2_mix_q + log2_q - log2_m))
            else:  # skew reverse KL
                value = LN2 * q_term
                weight = _zero_if(q == 0, q * tl.exp2(log2_mix_q + log2_q - log2_m)) - LN2 * q_term
        return value, weight

    @triton.jit
    def _relative_value_step(value, old_sum, rescale, shift_x, shift_y, exps_x, x_gap, y_gap):
        """One tile of `sum_v 2^((x - ref_x) scale) ((x - ref_x) - (y - ref_y))` kept against the
        current references: moving them by `shift_x`, `shift_y` moves every earlier difference by
        `shift_y - shift_x`. Columns where x is -inf weigh nothing (0 * inf must not be NaN)."""
        moved = rescale * (value + tl.where(old_sum == 0, 0.0, (shift_y - shift_x) * old_sum))
        return moved + tl.sum(_zero_if(x_gap == float("-inf"), exps_x * (x_gap - y_gap)), axis=1)

    @triton.jit
    def _load_scalars(scalars_ptr):
        """The `divergence_scalars` tensor: scale (log2(e) / T), scale_low, 1 / T, the mixture's
        weights and their base-2 logs."""
        return (tl.load(scalars_ptr + 0), tl.load(scalars_ptr + 1), tl.load(scalars_ptr + 2), tl.load(scalars_ptr + 3),
                tl.load(scalars_ptr + 4), tl.load(scalars_ptr + 5), tl.load(scalars_ptr + 6))

    @triton.jit
    def _divergence_forward_kernel(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, stats_ptr, entropy_ptr,
        scalars_ptr, n_rows, vocab, stride_student, stride_teacher, ignore_index,
        DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, FP64: tl.constexpr,
        STUDENT_MAP: tl.constexpr, TEACHER_MAP: tl.constexpr, ENTROPY: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        scale, scale_low, inv_temperature, mix_p, mix_q, log2_mix_p, log2_mix_q = _load_scalars(scalars_ptr)
        s_scale, s_cap, s_ratio = load_map(scalars_ptr + 7, STUDENT_MAP)
        t_scale, t_cap, t_ratio = load_map(scalars_ptr + 10, TEACHER_MAP)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        active = rows < n_rows
        if HAS_LABELS:
            labels = tl.load(labels_ptr + rows, mask=active, other=ignore_index)
            active = active & (labels != ignore_index) & (labels < vocab)
        student_rows = student_ptr + rows[:, None] * stride_student
        teacher_rows = teacher_ptr + rows[:, None] * stride_teacher

        max_s = tl.full([BLOCK_N], float("-inf"), acc_dtype)
        max_t = tl.full([BLOCK_N], float("-inf"), acc_dtype)
        sum_s = tl.zeros([BLOCK_N], acc_dtype)
        sum_t = tl.zeros([BLOCK_N], acc_dtype)
        lane_max_s = tl.full([BLOCK_N, BLOCK_V], float("-inf"), acc_dtype)
        lane_top_s = tl.zeros([BLOCK_N, BLOCK_V], tl.int32)
        # Forward/reverse KL: sum_v 2^((x - ref_x) scale) * ((x - ref_x) - (y - ref_y)), x the
        # weighting side: every difference is taken against the running references, so a huge logit
        # never meets the log-sum-exps in a float32 cancellation (the references cancel exactly).
        online_value = tl.zeros([BLOCK_N], acc_dtype)
        online_entropy = tl.zeros([BLOCK_N], acc_dtype)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            s = mapped(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
            t = mapped(t, t_scale, t_cap, t_ratio, TEACHER_MAP)
            lane_max_s, lane_top_s = lane_argmax_step(lane_max_s, lane_top_s, s, cols)
            old_ref_s, old_ref_t, old_sum_s, old_sum_t = row_reference(max_s), row_reference(max_t), sum_s, sum_t
            max_s, sum_s, exps_s, rescale_s = online_logsumexp_step(max_s, sum_s, s, scale)
            max_t, sum_t, exps_t, rescale_t = online_logsumexp_step(max_t, sum_t, t, scale)
            ref_s, ref_t = row_reference(max_s), row_reference(max_t)
            if ENTROPY:
                online_entropy = entropy_step(online_entropy, old_sum_s, rescale_s, ref_s - old_ref_s, exps_s,
                                               s - ref_s[:, None])
            if DIVERGENCE == FORWARD_KL:
                online_value = _relative_value_step(online_value, old_sum_t, rescale_t, ref_t - old_ref_t,
                                                    ref_s - old_ref_s, exps_t, t - ref_t[:, None], s - ref_s[:, None])
            elif DIVERGENCE == REVERSE_KL:
                online_value = _relative_value_step(online_value, old_sum_s, rescale_s, ref_s - old_ref_s,
                                                    ref_t - old_ref_t, exps_s, s - ref_s[:, None], t - ref_t[:, None])
        top_s = first_argmax(lane_max_s, lane_top_s, max_s)
        max_s, log_sum_s = finish_logsumexp(max_s, sum_s)
        max_t, log_sum_t = finish_logsumexp(max_t, sum_t)
        # With lse = max / T + ln2 log_sum, the maxima cancel against the references above.
        log_sum_gap = LN2 * (log_sum_s - log_sum_t)

        if DIVERGENCE == FORWARD_KL:  # E_p[t - s] / T - lse_t + lse_s
            loss = inv_temperature * online_value / sum_t + log_sum_gap
            row_sum = tl.full([BLOCK_N], 1.0, acc_dtype)
        elif DIVERGENCE == REVERSE_KL:  # E_q[s - t] / T - lse_s + lse_t; W = -loss
            loss = inv_temperature * online_value / sum_s - log_sum_gap
            row_sum = -loss
        else:
            # Per-lane partial sums, reduced once after the loop rather than once per tile.
            loss_lanes = tl.zeros([BLOCK_N, BLOCK_V], acc_dtype)
            weight_lanes = tl.zeros([BLOCK_N, BLOCK_V], acc_dtype)
            for start in range(0, vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = active[:, None] & (cols[None, :] < vocab)
                s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
                t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
                s = mapped(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
                t = mapped(t, t_scale, t_cap, t_ratio, TEACHER_MAP)
                value, weight = divergence_terms(
                    log2_softmax(s, scale, scale_low, max_s[:, None], log_sum_s[:, None]),
                    log2_softmax(t, scale, scale_low, max_t[:, None], log_sum_t[:, None]),
                    mix_p, mix_q, log2_mix_p, log2_mix_q, DIVERGENCE)
                loss_lanes += _zero_unless(mask, value)
                weight_lanes += _zero_unless(mask, weight)
            loss = tl.sum(loss_lanes, axis=1)
            row_sum = tl.sum(weight_lanes, axis=1)

        # A row without a distribution (every shared logit of one side -inf: log_sum = -inf, while a
        # NaN from a +inf logit stays NaN) contributes 0 and gets no gradient (see the backward).
        defined = (log_sum_s != float("-inf")) & (log_sum_t != float("-inf"))
        tl.store(loss_ptr + rows, _zero_unless(active & defined, loss), mask=rows < n_rows)
        if ENTROPY:  # -E_q[log q] = ln Z - E_q[s - ref] / T, both terms >= 0: no cancellation
            entropy = LN2 * log_sum_s - inv_temperature * online_entropy / sum_s
            tl.store(entropy_ptr + rows, _zero_unless(active & defined, entropy), mask=rows < n_rows)
        stats = stats_ptr + rows * _STATS
        tl.store(stats + _MAX_S, max_s, mask=active)
        tl.store(stats + _LOG_SUM_S, log_sum_s, mask=active)
        # The top column only where q there exceeds 1/2 (q(top) = 2^-log_sum_s), the one place its
        # `w - q W` can cancel; elsewhere its own formula is as accurate as every other column's,
        # while minus the others' sum would carry their absolute rounding error (~V float32 terms)
        # into a small q. -1 names no column (`registry.STAT_TOP_S`).
        tl.store(stats + _TOP_S, tl.where(log_sum_s < 1.0, top_s, -1).to(acc_dtype), mask=active)
        tl.store(stats + _MAX_T, max_t, mask=active)
        tl.store(stats + _LOG_SUM_T, log_sum_t, mask=active)
        tl.store(stats + _ROW_WEIGHT, row_sum, mask=active)

    @triton.jit
    def _divergence_backward_kernel(
        student_ptr, teacher_ptr, stats_ptr, row_scale_ptr, grad_ptr, scalars_ptr,
        n_rows, vocab, student_vocab, stride_student, stride_teacher, stride_grad,
        DIVERGENCE: tl.constexpr, FP64: tl.constexpr, STUDENT_MAP: tl.constexpr, TEACHER_MAP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        scale, scale_low, inv_temperature, mix_p, mix_q, log2_mix_p, log2_mix_q = _load_scalars(scalars_ptr)
        s_scale, s_cap, s_ratio = load_map(scalars_ptr + 7, STUDENT_MAP)
        t_scale, t_cap, t_ratio = load_map(scalars_ptr + 10, TEACHER_MAP)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        # row_scale is 0 on inactive rows (and on rows whose incoming gradient is 0): their
        # gradient is exactly 0 and their logits are never read.
        row_scale = tl.load(row_scale_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
        scaled = in_range & (row_scale != 0.0)
        stats = stats_ptr + rows * _STATS
        max_s = tl.load(stats + _MAX_S, mask=scaled, other=0.0).to(acc_dtype)
        log_sum_s = tl.load(stats + _LOG_SUM_S, mask=scaled, other=0.0).to(acc_dtype)
        top_s = tl.load(stats + _TOP_S, mask=scaled, other=-1.0).to(tl.int32)
        max_t = tl.load(stats + _MAX_T, mask=scaled, other=0.0).to(acc_dtype)
        log_sum_t = tl.load(stats + _LOG_SUM_T, mask=scaled, other=0.0).to(acc_dtype)
        row_sum = tl.load(stats + _ROW_WEIGHT, mask=scaled, other=0.0).to(acc_dtype)
        # Rows without a distribution (the forward's `defined`) get gradient 0, like inactive ones.
        active = scaled & (log_sum_s != float("-inf")) & (log_sum_t != float("-inf"))
        coefficient = -row_scale * inv_temperature
        student_rows = student_ptr + rows[:, None] * stride_student
        teacher_rows = teacher_ptr + rows[:, None] * stride_teacher
        grad_rows = grad_ptr + rows[:, None] * stride_grad
        other_columns = tl.zeros([BLOCK_N, BLOCK_V], acc_dtype)
        for start in range(0, student_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            # Columns past the shared vocabulary (a larger student) get gradient 0.
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            if STUDENT_MAP != 0:
                s, slope = mapped_with_slope(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
            t = mapped(t, t_scale, t_cap, t_ratio, TEACHER_MAP)
            log2_q = log2_softmax(s, scale, scale_low, max_s[:, None], log_sum_s[:, None])
            _, weight = divergence_terms(log2_q, log2_softmax(t, scale, scale_low, max_t[:, None], log_sum_t[:, None]),
                                         mix_p, mix_q, log2_mix_p, log2_mix_q, DIVERGENCE)
            grad = _zero_unless(mask, coefficient[:, None] * (weight - tl.exp2(log2_q) * row_sum[:, None]))
            other_columns, store_mask = top_column_step(other_columns, grad, cols, top_s, in_range, student_vocab)
            if STUDENT_MAP != 0:  # the sums above stay wrt the mapped logits (they sum to 0)
                grad = grad * slope
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=store_mask)
        # The top column, once per row that names one: the loop left it unwritten, so an in-place
        # gradient still holds its logit (a row without a distribution writes 0 there).
        pivoted = in_range & (top_s >= 0)
        top_active = (active & pivoted)[:, None]
        s = tl.load(student_rows + top_s[:, None], mask=top_active, other=0.0).to(acc_dtype)
        t = tl.load(teacher_rows + top_s[:, None], mask=top_active, other=0.0).to(acc_dtype)
        top_slope = 1.0
        if STUDENT_MAP != 0:
            s, top_slope = mapped_with_slope(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
        t = mapped(t, t_scale, t_cap, t_ratio, TEACHER_MAP)
        log2_q = log2_softmax(s, scale, scale_low, max_s[:, None], log_sum_s[:, None])
        _, weight = divergence_terms(log2_q, log2_softmax(t, scale, scale_low, max_t[:, None], log_sum_t[:, None]),
                                     mix_p, mix_q, log2_mix_p, log2_mix_q, DIVERGENCE)
        top_formula = tl.where(top_active, coefficient[:, None] * (weight - tl.exp2(log2_q) * row_sum[:, None]), 0.0)
        store_top_column(grad_rows, top_s, other_columns, top_formula, pivoted, top_slope, STUDENT_MAP != 0)


def divergence_scalars(temperature, log_mix_p, log_mix_q, acc_dtype, device, logit_maps=IDENTITY_MAPS):
    """`[scale, scale_low, 1 / T, mix_p, mix_q, log2 mix_p, log2 mix_q]`: `temperature_scalars` and the
    mixture `m = mix_p p + mix_q q`; then the maps' `maps.map_scalars` (at 7 and 10)."""
    return kernel_scalars(temperature_scalars(temperature, acc_dtype) + [
        math.exp(log_mix_p), math.exp(log_mix_q), log_mix_p * LOG2E, log_mix_q * LOG2E] + map_scalars(logit_maps),
        acc_dtype, device)


def divergence_forward(student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q, ignore_index,
                       logit_maps=IDENTITY_MAPS, with_entropy=False):
    """Per-row loss `[N]` and stats `[N, DIVERGENCE_STATS]` (`registry.STAT_*`, base 2) in the accumulation
    dtype; with `with_entropy`, the student's entropy per row (nats) as well."""
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    scalars = divergence_scalars(temperature, log_mix_p, log_mix_q, acc_dtype, student.device, logit_maps)
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.empty(n_rows, DIVERGENCE_STATS, dtype=acc_dtype, device=student.device)
    entropy = torch.empty(n_rows, dtype=acc_dtype, device=student.device) if with_entropy else None
    if n_rows == 0:
        return DivergenceForward(loss, stats, entropy)
    shape = launch_shape(n_rows, vocab, student.device, acc_dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _divergence_forward_kernel[grid](
        student, teacher, labels if labels is not None else student, loss, stats,
        entropy if with_entropy else loss,  # unwritten unless ENTROPY
        scalars, n_rows, vocab, student.stride(0), teacher.stride(0), ignore_index,
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None,
        FP64=acc_dtype == torch.float64, ENTROPY=bool(with_entropy), **map_codes(logit_maps), **shape,
    )
    return DivergenceForward(loss, stats, entropy)


def divergence_backward(student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p, log_mix_q,
                        logit_maps=IDENTITY_MAPS):
    """Write dL/ds into `grad` ([N, V_s], any row stride; it may be `student` itself)."""
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    if n_rows == 0:
        return grad
    scalars = divergence_scalars(temperature, log_mix_p, log_mix_q, stats.dtype, student.device, logit_maps)
    shape = launch_shape(n_rows, student.shape[1], student.device, stats.dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _divergence_backward_kernel[grid](
        student, teacher, stats, row_scale, grad, scalars,
        n_rows, vocab, student.shape[1], student.stride(0), teacher.stride(0), grad.stride(0),
        DIVERGENCE=DIVERGENCE_CODES[divergence], FP64=stats.dtype == torch.float64, **map_codes(logit_maps), **shape,
    )
    return grad
