"""Streaming Triton kernels for Hybrid Policy Distillation (spec, "Hybrid Policy Distillation").

Only four numbers per row enter HPD's weights: log q(y), log q(y_hat), log p(y), log p(y_hat).
So the forward is a single pass over the vocabulary that builds both log-sum-exps online and, when
the caller gives no `y_hat`, draws its block of columns by Gumbel-max over the blocks' log-masses
in the same loop, then the token inside that block from its P logits read once more
(`ops/gumbel.py`); the four logits themselves are gathered with scalar loads. The backward reads
only the student's logits:

    dL/ds[j] = -(row_scale / T) * (w_y 1[j = y] + w_hat 1[j = y_hat] - q(j) (w_y + w_hat))
"""

from __future__ import annotations

import torch

from ...registry import (HYBRID_STATS, IDENTITY_MAPS, STAT_LOG_SUM_S, STAT_MAX_S, STAT_TOP_S, STAT_W_LABEL,
                        STAT_W_SAMPLE, accumulation_dtype)
from ..backend_contract import HybridForward
from ..common import temperature_scalars
from ..gumbel import DRAW_BLOCK, GUMBEL2_MAX, LOG2_DRAW_BLOCK, seed_key
from .gumbel import (DRAW_P, block_log2_masses, block_seed_key_triton, gumbel2_at_triton, gumbel2_triton,
                     row_keys_triton)
from .maps import load_map, map_codes, map_scalars, mapped, mapped_with_slope
from .utils import (HAS_TRITON, LN2, entropy_step, finish_logsumexp, kernel_scalars, launch_shape, log2_softmax,
                    online_logsumexp_step, row_reference, store_top_column, tl, top_column_step, triton)

# The registry's stats columns, as constexprs a kernel may read.
_MAX_S, _LOG_SUM_S, _TOP_S, _W_LABEL, _W_SAMPLE, _STATS = (
    tl.constexpr(column) if HAS_TRITON else column for column in
    (STAT_MAX_S, STAT_LOG_SUM_S, STAT_TOP_S, STAT_W_LABEL, STAT_W_SAMPLE, HYBRID_STATS))

if HAS_TRITON:
    NOISE_MAX = tl.constexpr(GUMBEL2_MAX)  # kernels read only constexpr globals
    # A block's log-mass is at most its max + log2(P): a tile whose bound (with a margin for the
    # roundings) cannot beat the best block so far skips the masses.
    _SKIP_BOUND = tl.constexpr(GUMBEL2_MAX + LOG2_DRAW_BLOCK + 1.0)

    @triton.jit
    def _draw_in_block(student_rows, block, keys, active, vocab, scale, acc_dtype: tl.constexpr, map_scale,
                       map_cap, map_ratio, MAP: tl.constexpr):
        """The token inside each row's drawn block: Gumbel-max over its DRAW_P (mapped) logits with
        the column noise, ties to the first column."""
        cols = block[:, None] * DRAW_P + tl.arange(0, DRAW_P)[None, :]
        mask = active[:, None] & (cols < vocab)
        s = tl.load(student_rows[:, None] + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        s = mapped(s, map_scale, map_cap, map_ratio, MAP)
        score = (s * scale).to(tl.float32) + gumbel2_at_triton(keys, cols)
        score = tl.where(score != score, float("inf"), score)  # NaN (a NaN logit) ranks first, as in torch
        _, column = tl.max(score, axis=1, return_indices=True)
        return block * DRAW_P + column

    @triton.jit
    def _log_prob_at(row_ptrs, ids, active, inv_temperature, row_max, row_log_sum, acc_dtype: tl.constexpr,
                     map_scale, map_cap, map_ratio, MAP: tl.constexpr):
        """Natural log-softmax at one column per row from the base-2 stats, formed in natural units
        (once per row: one rounding fewer than converting a base-2 log-probability); the logit mapped
        by the side's map (`maps.py`)."""
        logits = mapped(tl.load(row_ptrs + ids, mask=active, other=0.0).to(acc_dtype), map_scale, map_cap, map_ratio,
                        MAP)
        return (logits - row_max) * inv_temperature - LN2 * row_log_sum

    @triton.jit
    def _reverse_kl_weight(log_q, log_p):
        # d(v) = q (log p - log q), with 0 where q = 0 (a -inf student logit contributes nothing).
        q = tl.exp(log_q)
        return tl.where(q == 0, 0.0, q * (log_p - log_q))

    @triton.jit
    def hpd_pivot(log_q_y, log_q_hat, labels, sampled):
        """The column whose gradient the backward takes from the others' (`registry.STAT_TOP_S`): only
        `y` and `y_hat` carry a weight, so only there can `w - q (w_y + w_hat)` cancel, and only
        where q > 1/2; elsewhere -1 (none)."""
        pivot = tl.where(log_q_y >= log_q_hat, labels, sampled)
        return tl.where(tl.maximum(log_q_y, log_q_hat) > -0.6931471805599453, pivot, -1)

    @triton.jit
    def _weighted(weight, log_q):
        return tl.where(weight == 0, 0.0, weight * log_q)

    @triton.jit(do_not_specialize=["seed"])
    def _hybrid_forward_kernel(
        student_ptr, teacher_ptr, labels_ptr, sampled_ptr, loss_ptr, stats_ptr, entropy_ptr, scalars_ptr, row_ids_ptr,
        n_rows, vocab, stride_student, stride_teacher, ignore_index, seed,
        SAMPLE: tl.constexpr, FP64: tl.constexpr, STUDENT_MAP: tl.constexpr, TEACHER_MAP: tl.constexpr,
        ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # `seed` is never specialised: the JIT would turn a value of 1 into a
        # constant, on which the uint32 casts below do not compile.
        acc_dtype = tl.float64 if FP64 else tl.float32
        scale = tl.load(scalars_ptr + 0)  # log2(e) / T
        inv_temperature = tl.load(scalars_ptr + 2)
        fkl_weight = tl.load(scalars_ptr + 3)
        rkl_weight = tl.load(scalars_ptr + 4)
        s_scale, s_cap, s_ratio = load_map(scalars_ptr + 5, STUDENT_MAP)
        t_scale, t_cap, t_ratio = load_map(scalars_ptr + 8, TEACHER_MAP)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        labels = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
        active = in_range & (labels != ignore_index) & (labels < vocab)
        student_rows = student_ptr + rows * stride_student
        teacher_rows = teacher_ptr + rows * stride_teacher

        max_s = tl.full([BLOCK_N], float("-inf"), acc_dtype)
        max_t = tl.full([BLOCK_N], float("-inf"), acc_dtype)
        sum_s = tl.zeros([BLOCK_N], acc_dtype)
        sum_t = tl.zeros([BLOCK_N], acc_dtype)
        online_entropy = tl.zeros([BLOCK_N], acc_dtype)  # see `utils.entropy_step`
        if SAMPLE:
            # Noise is keyed by the row's index in the whole batch, so a chunked call draws the
            # same tokens as an unchunked one.
            row_ids = tl.load(row_ids_ptr + rows, mask=in_range, other=0)
            keys = row_keys_triton(seed, row_ids)
            block_keys = row_keys_triton(block_seed_key_triton(seed), row_ids)
            best_score = tl.full([BLOCK_N], float("-inf"), tl.float32)
            best_block = tl.zeros([BLOCK_N], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            t = tl.load(teacher_rows[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            # Mapped as loaded: the draw below is from the mapped student too.
            s = mapped(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
            t = mapped(t, t_scale, t_cap, t_ratio, TEACHER_MAP)
            if ENTROPY:
                old_ref_s, old_sum_s = row_reference(max_s), sum_s
                max_s, sum_s, exps_s, rescale_s = online_logsumexp_step(max_s, sum_s, s, scale)
                ref_s = row_reference(max_s)
                online_entropy = entropy_step(online_entropy, old_sum_s, rescale_s, ref_s - old_ref_s, exps_s,
                                               s - ref_s[:, None])
            else:
                max_s, sum_s, _, _ = online_logsumexp_step(max_s, sum_s, s, scale)
            max_t, sum_t, _, _ = online_logsumexp_step(max_t, sum_t, t, scale)
            if SAMPLE:
                # The block draw (`ops/gumbel.py`): Gumbel-max in base 2 over the tile's blocks,
                # argmax(m_b + block noise). A block's score is at most its tile's max logit (scaled)
                # + log2(P) + NOISE_MAX, so a tile that cannot beat the running best skips its masses
                # (on peaked logits, most tiles); the margin covers the roundings.
                tile_max = (tl.max(s, axis=1) * scale).to(tl.float32)
                if tl.max(tile_max + _SKIP_BOUND + tl.abs(best_score) * 1e-6 - best_score, axis=0) > 0:
                    first_block = start // DRAW_P
                    score = (block_log2_masses(s, scale, BLOCK_N, BLOCK_V).to(tl.float32)
                             + gumbel2_triton(block_keys, first_block + tl.arange(0, BLOCK_V // DRAW_P)))
                    score = tl.where(score != score, float("inf"), score)  # a NaN mass ranks first
                    # Ties keep the first block, and strictly greater keeps the earlier tile, so
                    # the draw does not depend on the tile width.
                    tile_best, tile_block = tl.max(score, axis=1, return_indices=True)
                    better = tile_best > best_score
                    best_block = tl.where(better, tile_block + first_block, best_block)
                    best_score = tl.where(better, tile_best, best_score)
        max_s, log_sum_s = finish_logsumexp(max_s, sum_s)
        max_t, log_sum_t = finish_logsumexp(max_t, sum_t)

        if SAMPLE:
            sampled = _draw_in_block(student_rows, best_block, keys, active, vocab, scale, acc_dtype, s_scale, s_cap,
                                     s_ratio, STUDENT_MAP).to(tl.int64)
            tl.store(sampled_ptr + rows, tl.where(active, sampled, ignore_index), mask=in_range)
        else:
            sampled = tl.load(sampled_ptr + rows, mask=active, other=0)

        log_q_y = _log_prob_at(student_rows, labels, active, inv_temperature, max_s, log_sum_s, acc_dtype,
                               s_scale, s_cap, s_ratio, STUDENT_MAP)
        log_p_y = _log_prob_at(teacher_rows, labels, active, inv_temperature, max_t, log_sum_t, acc_dtype,
                               t_scale, t_cap, t_ratio, TEACHER_MAP)
        log_q_hat = _log_prob_at(student_rows, sampled, active, inv_temperature, max_s, log_sum_s, acc_dtype,
                                 s_scale, s_cap, s_ratio, STUDENT_MAP)
        log_p_hat = _log_prob_at(teacher_rows, sampled, active, inv_temperature, max_t, log_sum_t, acc_dtype,
                                 t_scale, t_cap, t_ratio, TEACHER_MAP)
        d_y = _reverse_kl_weight(log_q_y, log_p_y)
        d_hat = _reverse_kl_weight(log_q_hat, log_p_hat)
        under = d_y > 0    # the student under-estimates the data token: p(y) > q(y)
        over = d_hat < 0   # the student over-estimates its own sample: q(y_hat) > p(y_hat)
        w_y = rkl_weight * d_y + tl.where(under, fkl_weight * tl.exp(log_p_y) * tl.where(over, 2.0, 1.0), 0.0)
        w_hat = tl.where(over & (sampled != labels), rkl_weight * d_hat, 0.0)
        loss = -(_weighted(w_y, log_q_y) + _weighted(w_hat, log_q_hat))

        # A row without a distribution (every shared logit of one side -inf) contributes 0 and,
        # its weights being 0, gets no gradient; a NaN from a +inf logit stays NaN.
        defined = active & (log_sum_s != float("-inf")) & (log_sum_t != float("-inf"))
        tl.store(loss_ptr + rows, tl.where(defined, loss, 0.0), mask=in_range)
        if ENTROPY:  # ln Z - E_q[s - ref] / T
            entropy = LN2 * log_sum_s - inv_temperature * online_entropy / sum_s
            tl.store(entropy_ptr + rows, tl.where(defined, entropy, 0.0), mask=in_range)
        stats = stats_ptr + rows * _STATS
        tl.store(stats + _MAX_S, max_s, mask=active)
        # A row whose teacher has no distribution is marked as the student's would be (log_sum -inf):
        # the backward then leaves it out, hard-label term included.
        tl.store(stats + _LOG_SUM_S, tl.where(log_sum_t != float("-inf"), log_sum_s, float("-inf")), mask=active)
        tl.store(stats + _TOP_S, hpd_pivot(log_q_y, log_q_hat, labels, sampled).to(acc_dtype), mask=active)
        tl.store(stats + _W_LABEL, tl.where(defined, w_y, 0.0), mask=in_range)
        tl.store(stats + _W_SAMPLE, tl.where(defined, w_hat, 0.0), mask=in_range)

    @triton.jit
    def _hybrid_backward_kernel(
        student_ptr, labels_ptr, sampled_ptr, stats_ptr, row_scale_ptr, grad_ptr, scalars_ptr,
        n_rows, vocab, student_vocab, stride_student, stride_grad,
        FP64: tl.constexpr, STUDENT_MAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        scale = tl.load(scalars_ptr + 0)
        scale_low = tl.load(scalars_ptr + 1)
        inv_temperature = tl.load(scalars_ptr + 2)
        s_scale, s_cap, s_ratio = load_map(scalars_ptr + 3, STUDENT_MAP)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        row_scale = tl.load(row_scale_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
        scaled = in_range & (row_scale != 0.0)
        stats = stats_ptr + rows * _STATS
        max_s = tl.load(stats + _MAX_S, mask=scaled, other=0.0).to(acc_dtype)
        log_sum_s = tl.load(stats + _LOG_SUM_S, mask=scaled, other=0.0).to(acc_dtype)
        # A student row without a distribution gets gradient 0 (a teacher row without one has
        # weights 0 already).
        active = scaled & (log_sum_s != float("-inf"))
        # 32-bit ids: the column compares in the loop are then one instruction each.
        labels = tl.load(labels_ptr + rows, mask=active, other=-1).to(tl.int32)
        sampled = tl.load(sampled_ptr + rows, mask=active, other=-1).to(tl.int32)
        top_s = tl.load(stats + _TOP_S, mask=active, other=-1.0).to(tl.int32)
        w_y = tl.load(stats + _W_LABEL, mask=active, other=0.0).to(acc_dtype)
        w_hat = tl.load(stats + _W_SAMPLE, mask=active, other=0.0).to(acc_dtype)
        coefficient = -row_scale * inv_temperature
        student_rows = student_ptr + rows[:, None] * stride_student
        grad_rows = grad_ptr + rows[:, None] * stride_grad
        other_columns = tl.zeros([BLOCK_N, BLOCK_V], acc_dtype)
        for start in range(0, student_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype)
            if STUDENT_MAP != 0:
                s, slope = mapped_with_slope(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
            q = tl.exp2(log2_softmax(s, scale, scale_low, max_s[:, None], log_sum_s[:, None]))
            weight = (tl.where(cols[None, :] == labels[:, None], w_y[:, None], 0.0)
                      + tl.where(cols[None, :] == sampled[:, None], w_hat[:, None], 0.0))
            grad = tl.where(mask, coefficient[:, None] * (weight - q * (w_y + w_hat)[:, None]), 0.0)
            other_columns, store_mask = top_column_step(other_columns, grad, cols, top_s, in_range, student_vocab)
            if STUDENT_MAP != 0:  # the sums above stay wrt the mapped logits
                grad = grad * slope
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=store_mask)
        # The pivot column by the formula, once per row (see `store_top_column`).
        pivoted = active & (top_s >= 0)
        s = tl.load(student_rows + top_s[:, None], mask=pivoted[:, None], other=0.0).to(acc_dtype)
        top_slope = 1.0
        if STUDENT_MAP != 0:
            s, top_slope = mapped_with_slope(s, s_scale, s_cap, s_ratio, STUDENT_MAP)
        q = tl.exp2(log2_softmax(s, scale, scale_low, max_s[:, None], log_sum_s[:, None]))
        weight = (tl.where(top_s == labels, w_y, 0.0) + tl.where(top_s == sampled, w_hat, 0.0))[:, None]
        top_formula = tl.where(pivoted[:, None], coefficient[:, None] * (weight - q * (w_y + w_hat)[:, None]), 0.0)
        store_top_column(grad_rows, top_s, other_columns, top_formula, pivoted, top_slope, STUDENT_MAP != 0)


def hybrid_forward(student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight, ignore_index,
                   row_ids=None, logit_maps=IDENTITY_MAPS, with_entropy=False):
    """Per-row loss `[N]`, stats `[N, HYBRID_STATS]` (`registry.STAT_*`, base 2) and `y_hat` `[N]` (int64);
    with `with_entropy`, the student's entropy per row (nats) as well.

    `sampled_ids=None` draws `y_hat` in the kernel from `seed` (from the mapped student), with the
    noise of each row's index in the batch, `row_ids` (None: `0..N-1`); inactive rows report `ignore_index`.
    """
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.empty(n_rows, HYBRID_STATS, dtype=acc_dtype, device=student.device)
    entropy = torch.empty(n_rows, dtype=acc_dtype, device=student.device) if with_entropy else None
    sample = sampled_ids is None
    if sample:
        sampled_ids = torch.empty(n_rows, dtype=torch.int64, device=student.device)
        row_ids = torch.arange(n_rows, device=student.device) if row_ids is None else row_ids
    if n_rows == 0:
        return HybridForward(loss, stats, sampled_ids, entropy)
    scalars = kernel_scalars(temperature_scalars(temperature, acc_dtype) + [fkl_weight, rkl_weight]
                             + map_scalars(logit_maps), acc_dtype, student.device)
    shape = launch_shape(n_rows, vocab, student.device, acc_dtype == torch.float64)
    shape["BLOCK_V"] = max(shape["BLOCK_V"], DRAW_BLOCK)  # a tile holds whole blocks of the draw
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _hybrid_forward_kernel[grid](
        student, teacher, labels, sampled_ids, loss, stats,
        entropy if with_entropy else loss,  # unwritten unless ENTROPY
        scalars, row_ids if sample else labels,  # unread unless SAMPLE
        n_rows, vocab, student.stride(0), teacher.stride(0), ignore_index, seed_key(seed or 0),
        SAMPLE=sample, FP64=acc_dtype == torch.float64, ENTROPY=bool(with_entropy), **map_codes(logit_maps), **shape,
    )
    return HybridForward(loss, stats, sampled_ids, entropy)


def hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature,
                    logit_maps=IDENTITY_MAPS):
    """Write dL/ds into `grad` ([N, V_s], any row stride; it may be `student` itself)."""
    n_rows = student.shape[0]
    if n_rows == 0:
        return grad
    scalars = kernel_scalars(temperature_scalars(temperature, stats.dtype) + map_scalars(logit_maps, student_only=True),
                             stats.dtype, student.device)
    shape = launch_shape(n_rows, student.shape[1], student.device, stats.dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _hybrid_backward_kernel[grid](
        student, labels, sampled_ids, stats, row_scale, grad, scalars,
        n_rows, vocab, student.shape[1], student.stride(0), grad.stride(0),
        FP64=stats.dtype == torch.float64, STUDENT_MAP=map_codes(logit_maps)["STUDENT_MAP"], **shape,
    )
    return grad
