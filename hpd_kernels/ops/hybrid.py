"""Streaming Triton kernels for Hybrid Policy Distillation (spec, "Hybrid Policy Distillation").

Only four numbers per row enter HPD's weights: log q(y), log q(y_hat), log p(y), log p(y_hat).
So the forward is a single pass over the vocabulary that builds both log-sum-exps online and, when
the caller gives no `y_hat`, draws it by Gumbel-max in the same loop; the four logits themselves
are gathered with scalar loads. The backward reads only the student's logits:

    dL/ds[j] = -(row_scale / T) * (w_y 1[j = y] + w_hat 1[j = y_hat] - q(j) (w_y + w_hat))
"""

from __future__ import annotations

import torch

from .gumbel import gumbel_triton, row_keys_triton, seed_key
from .divergence import kernel_scalars
from .triton_utils import HAS_TRITON, launch_shape, online_logsumexp_step, tl, triton

# Columns of the per-row stats: log-sum-exp of s / T, w_y, w_hat.
STAT_W_LABEL, STAT_W_SAMPLE = 1, 2

if HAS_TRITON:

    @triton.jit
    def _log_prob_at(row_ptrs, ids, active, inv_temperature, lse, acc_dtype: tl.constexpr):
        return tl.load(row_ptrs + ids, mask=active, other=0.0).to(acc_dtype) * inv_temperature - lse

    @triton.jit
    def _reverse_kl_weight(log_q, log_p):
        # d(v) = q (log p - log q), with 0 where q = 0 (a -inf student logit contributes nothing).
        q = tl.exp(log_q)
        return tl.where(q == 0, 0.0, q * (log_p - log_q))

    @triton.jit
    def _weighted(weight, log_q):
        return tl.where(weight == 0, 0.0, weight * log_q)

    @triton.jit
    def _hybrid_forward_kernel(
        student_ptr, teacher_ptr, labels_ptr, sampled_ptr, loss_ptr, stats_ptr, scalars_ptr,
        n_rows, vocab, stride_student, stride_teacher, ignore_index, seed, row_offset,
        SAMPLE: tl.constexpr, FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        inv_temperature = tl.load(scalars_ptr + 0)
        fkl_weight = tl.load(scalars_ptr + 1)
        rkl_weight = tl.load(scalars_ptr + 2)
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
        if SAMPLE:
            # Noise is keyed by the row's index in the whole batch, so a chunked call draws the
            # same tokens as an unchunked one.
            keys = row_keys_triton(seed, rows + row_offset)
            best_score = tl.full([BLOCK_N], float("-inf"), tl.float32)
            best_id = tl.zeros([BLOCK_N], tl.int64)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            t = tl.load(teacher_rows[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            max_s, sum_s, _, _ = online_logsumexp_step(max_s, sum_s, s)
            max_t, sum_t, _, _ = online_logsumexp_step(max_t, sum_t, t)
            if SAMPLE:
                # Gumbel-max: y_hat = argmax(s / T + g). Strictly greater keeps the first maximum.
                score = s.to(tl.float32) + gumbel_triton(keys, cols.to(tl.int64))
                tile_best = tl.max(score, axis=1)
                tile_id = tl.argmax(score, axis=1).to(tl.int64) + start
                better = tile_best > best_score
                best_id = tl.where(better, tile_id, best_id)
                best_score = tl.where(better, tile_best, best_score)
        lse_s = tl.where(max_s == float("-inf"), 0.0, max_s) + tl.log(sum_s)
        lse_t = tl.where(max_t == float("-inf"), 0.0, max_t) + tl.log(sum_t)

        if SAMPLE:
            sampled = best_id
            tl.store(sampled_ptr + rows, tl.where(active, sampled, ignore_index), mask=in_range)
        else:
            sampled = tl.load(sampled_ptr + rows, mask=active, other=0)

        log_q_y = _log_prob_at(student_rows, labels, active, inv_temperature, lse_s, acc_dtype)
        log_p_y = _log_prob_at(teacher_rows, labels, active, inv_temperature, lse_t, acc_dtype)
        log_q_hat = _log_prob_at(student_rows, sampled, active, inv_temperature, lse_s, acc_dtype)
        log_p_hat = _log_prob_at(teacher_rows, sampled, active, inv_temperature, lse_t, acc_dtype)
        d_y = _reverse_kl_weight(log_q_y, log_p_y)
        d_hat = _reverse_kl_weight(log_q_hat, log_p_hat)
        under = d_y > 0    # the student under-estimates the data token: p(y) > q(y)
        over = d_hat < 0   # the student over-estimates its own sample: q(y_hat) > p(y_hat)
        w_y = rkl_weight * d_y + tl.where(under, fkl_weight * tl.exp(log_p_y) * tl.where(over, 2.0, 1.0), 0.0)
        w_hat = tl.where(over & (sampled != labels), rkl_weight * d_hat, 0.0)
        loss = -(_weighted(w_y, log_q_y) + _weighted(w_hat, log_q_hat))

        tl.store(loss_ptr + rows, tl.where(active, loss, 0.0), mask=in_range)
        stats = stats_ptr + rows * 3
        tl.store(stats + 0, lse_s, mask=active)
        tl.store(stats + 1, tl.where(active, w_y, 0.0), mask=in_range)
        tl.store(stats + 2, tl.where(active, w_hat, 0.0), mask=in_range)

    @triton.jit
    def _hybrid_backward_kernel(
        student_ptr, labels_ptr, sampled_ptr, stats_ptr, row_scale_ptr, grad_ptr, scalars_ptr,
        n_rows, vocab, student_vocab, stride_student, stride_grad,
        FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        inv_temperature = tl.load(scalars_ptr + 0)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        row_scale = tl.load(row_scale_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
        active = in_range & (row_scale != 0.0)
        labels = tl.load(labels_ptr + rows, mask=active, other=-1)
        sampled = tl.load(sampled_ptr + rows, mask=active, other=-1)
        stats = stats_ptr + rows * 3
        lse_s = tl.load(stats + 0, mask=active, other=0.0).to(acc_dtype)
        w_y = tl.load(stats + 1, mask=active, other=0.0).to(acc_dtype)
        w_hat = tl.load(stats + 2, mask=active, other=0.0).to(acc_dtype)
        coefficient = -row_scale * inv_temperature
        student_rows = student_ptr + rows[:, None] * stride_student
        grad_rows = grad_ptr + rows[:, None] * stride_grad
        for start in range(0, student_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            q = tl.exp(s - lse_s[:, None])
            weight = (tl.where(cols[None, :] == labels[:, None], w_y[:, None], 0.0)
                      + tl.where(cols[None, :] == sampled[:, None], w_hat[:, None], 0.0))
            grad = coefficient[:, None] * (weight - q * (w_y + w_hat)[:, None])
            tl.store(grad_rows + cols[None, :], tl.where(mask, grad, 0.0).to(grad_ptr.dtype.element_ty),
                     mask=in_range[:, None] & (cols[None, :] < student_vocab))


def hybrid_forward(student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight, ignore_index,
                   row_offset=0):
    """Per-row loss `[N]`, stats `[N, 3]` (lse_s, w_y, w_hat) and `y_hat` `[N]` (int64).

    `sampled_ids=None` draws `y_hat` in the kernel from `seed`, with the noise of rows
    `row_offset + i`; inactive rows report `ignore_index`.
    """
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.empty(n_rows, 3, dtype=acc_dtype, device=student.device)
    sample = sampled_ids is None
    if sample:
        sampled_ids = torch.empty(n_rows, dtype=torch.int64, device=student.device)
    if n_rows == 0:
        return loss, stats, sampled_ids
    scalars = kernel_scalars([1.0 / temperature, fkl_weight, rkl_weight], acc_dtype, student.device)
    shape = launch_shape(n_rows, vocab, student.device, acc_dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _hybrid_forward_kernel[grid](
        student, teacher, labels, sampled_ids, loss, stats, scalars,
        n_rows, vocab, student.stride(0), teacher.stride(0), ignore_index, seed_key(seed or 0), row_offset,
        SAMPLE=sample, FP64=acc_dtype == torch.float64, **shape,
    )
    return loss, stats, sampled_ids


def hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature):
    """Write dL/ds into `grad` ([N, V_s], any row stride; it may be `student` itself)."""
    n_rows = student.shape[0]
    if n_rows == 0:
        return grad
    scalars = kernel_scalars([1.0 / temperature], stats.dtype, student.device)
    shape = launch_shape(n_rows, student.shape[1], student.device, stats.dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _hybrid_backward_kernel[grid](
        student, labels, sampled_ids, stats, row_scale, grad, scalars,
        n_rows, vocab, student.shape[1], student.stride(0), grad.stride(0),
        FP64=stats.dtype == torch.float64, **shape,
    )
    return grad


class HybridFunction(torch.autograd.Function):
    """Per-row HPD losses `[N]`, plus `y_hat`, `w_y`, `w_hat` (no gradient) from one forward pass.

    `impl` and `active` as in `DivergenceFunction`.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, active, sampled_ids, seed, temperature, fkl_weight, rkl_weight,
                ignore_index, impl):
        loss, stats, sampled_ids = impl.hybrid_forward(
            student, teacher, labels, sampled_ids, seed=seed, temperature=temperature,
            fkl_weight=fkl_weight, rkl_weight=rkl_weight, ignore_index=ignore_index)
        vocab = min(student.shape[1], teacher.shape[1])
        ctx.save_for_backward(student, labels, sampled_ids, stats, active)
        ctx.params = (vocab, temperature, impl)
        w_y, w_hat = stats[:, STAT_W_LABEL].clone(), stats[:, STAT_W_SAMPLE].clone()
        ctx.mark_non_differentiable(sampled_ids, w_y, w_hat)
        return loss, sampled_ids, w_y, w_hat

    @staticmethod
    def backward(ctx, grad_per_row, *_):
        student, labels, sampled_ids, stats, active = ctx.saved_tensors
        vocab, temperature, impl = ctx.params
        grad = None
        if ctx.needs_input_grad[0]:
            row_scale = torch.where(active, grad_per_row.to(stats.dtype), 0.0).contiguous()
            grad = impl.hybrid_backward(
                student, labels, sampled_ids, stats, row_scale,
                torch.empty_like(student, memory_format=torch.contiguous_format),
                vocab=vocab, temperature=temperature)
        return grad, None, None, None, None, None, None, None, None, None, None
