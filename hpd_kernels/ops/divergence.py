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

from .triton_utils import HAS_TRITON, launch_shape, logaddexp, online_logsumexp_step, tl, triton

# Divergence codes: the kernels' DIVERGENCE constexpr.
FORWARD_KL, REVERSE_KL, JSD, SKEW_FORWARD_KL, SKEW_REVERSE_KL, TVD = range(6)
DIVERGENCE_CODES = {
    "forward_kl": FORWARD_KL,
    "reverse_kl": REVERSE_KL,
    "jsd": JSD,
    "skew_forward_kl": SKEW_FORWARD_KL,
    "skew_reverse_kl": SKEW_REVERSE_KL,
    "tvd": TVD,
}


def mixture_logs(divergence: str, beta: float, alpha: float) -> tuple[str, float, float]:
    """Resolve the endpoints of JSD and the mixture `m = a p + b q` as `(divergence, log a, log b)`."""
    def log(x):
        return math.log(x) if x > 0 else -math.inf

    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl", 0.0, 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0, 0.0
        return "jsd", log(beta), log(1.0 - beta)
    if divergence == "skew_forward_kl":  # m = alpha p + (1 - alpha) q
        return divergence, log(alpha), log(1.0 - alpha)
    if divergence == "skew_reverse_kl":  # m = alpha q + (1 - alpha) p
        return divergence, log(1.0 - alpha), log(alpha)
    return divergence, 0.0, 0.0


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
    def divergence_terms(log_q, log_p, log_mix_p, log_mix_q, DIVERGENCE: tl.constexpr):
        """Per-token value and weight `w` of one divergence, from the two log-softmaxes."""
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if DIVERGENCE == 0:  # forward KL
            value = _zero_if(p == 0, p * (log_p - log_q))
            weight = p
        elif DIVERGENCE == 1:  # reverse KL
            value = _zero_if(q == 0, q * (log_q - log_p))
            weight = -value
        elif DIVERGENCE == 2:  # generalized JSD: m = beta p + (1 - beta) q
            log_m = logaddexp(log_mix_p + log_p, log_mix_q + log_q)
            value = (tl.exp(log_mix_p) * _zero_if(p == 0, p * (log_p - log_m))
                     + tl.exp(log_mix_q) * _zero_if(q == 0, q * (log_q - log_m)))
            weight = tl.exp(log_mix_q) * _zero_if(q == 0, q * (log_m - log_q))
        elif DIVERGENCE == 3:  # skew forward KL: m = alpha p + (1 - alpha) q
            log_m = logaddexp(log_mix_p + log_p, log_mix_q + log_q)
            value = _zero_if(p == 0, p * (log_p - log_m))
            # (1 - alpha) p q / m from logs: q / m stays O(1) where q alone underflows to 0 (alpha -> 0).
            weight = _zero_if((log_p == float("-inf")) | (log_q == float("-inf")),
                              tl.exp(log_mix_q + log_p + log_q - log_m))
        elif DIVERGENCE == 4:  # skew reverse KL: m = alpha q + (1 - alpha) p
            log_m = logaddexp(log_mix_p + log_p, log_mix_q + log_q)
            value = _zero_if(q == 0, q * (log_q - log_m))
            weight = _zero_if(q == 0, q * (log_m - log_q + tl.exp(log_mix_q + log_q - log_m)))
        else:  # total variation
            value = 0.5 * tl.abs(p - q)
            weight = 0.5 * q * tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        return value, weight

    @triton.jit
    def _divergence_forward_kernel(
        student_ptr, teacher_ptr, labels_ptr, loss_ptr, stats_ptr,
        scalars_ptr, n_rows, vocab, stride_student, stride_teacher, ignore_index,
        DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, FP64: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        inv_temperature = tl.load(scalars_ptr + 0)
        log_mix_p = tl.load(scalars_ptr + 1)
        log_mix_q = tl.load(scalars_ptr + 2)
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
        # Forward/reverse KL: sum_v exp(x - ref) * (x - other), rescaled like the sums above.
        online_value = tl.zeros([BLOCK_N], acc_dtype)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            max_s, sum_s, exps_s, rescale_s = online_logsumexp_step(max_s, sum_s, s)
            max_t, sum_t, exps_t, rescale_t = online_logsumexp_step(max_t, sum_t, t)
            if DIVERGENCE == 0:
                online_value = online_value * rescale_t + tl.sum(_zero_if(t == float("-inf"), exps_t * (t - s)), axis=1)
            elif DIVERGENCE == 1:
                online_value = online_value * rescale_s + tl.sum(_zero_if(s == float("-inf"), exps_s * (s - t)), axis=1)
        lse_s = tl.where(max_s == float("-inf"), 0.0, max_s) + tl.log(sum_s)
        lse_t = tl.where(max_t == float("-inf"), 0.0, max_t) + tl.log(sum_t)

        if DIVERGENCE == 0:  # E_p[t - s] - lse_t + lse_s
            loss = online_value / sum_t - lse_t + lse_s
            row_sum = tl.full([BLOCK_N], 1.0, acc_dtype)
        elif DIVERGENCE == 1:  # E_q[s - t] - lse_s + lse_t; W = -loss
            loss = online_value / sum_s - lse_s + lse_t
            row_sum = -loss
        else:
            loss = tl.zeros([BLOCK_N], acc_dtype)
            row_sum = tl.zeros([BLOCK_N], acc_dtype)
            for start in range(0, vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = active[:, None] & (cols[None, :] < vocab)
                s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
                t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
                value, weight = divergence_terms(s - lse_s[:, None], t - lse_t[:, None], log_mix_p, log_mix_q, DIVERGENCE)
                loss += tl.sum(_zero_unless(mask, value), axis=1)
                row_sum += tl.sum(_zero_unless(mask, weight), axis=1)

        tl.store(loss_ptr + rows, _zero_unless(active, loss), mask=rows < n_rows)
        stats = stats_ptr + rows * 3
        tl.store(stats + 0, lse_s, mask=active)
        tl.store(stats + 1, lse_t, mask=active)
        tl.store(stats + 2, row_sum, mask=active)

    @triton.jit
    def _divergence_backward_kernel(
        student_ptr, teacher_ptr, stats_ptr, row_scale_ptr, grad_ptr, scalars_ptr,
        n_rows, vocab, student_vocab, stride_student, stride_teacher, stride_grad,
        DIVERGENCE: tl.constexpr, FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        acc_dtype = tl.float64 if FP64 else tl.float32
        inv_temperature = tl.load(scalars_ptr + 0)
        log_mix_p = tl.load(scalars_ptr + 1)
        log_mix_q = tl.load(scalars_ptr + 2)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        # row_scale is 0 on inactive rows (and on rows whose incoming gradient is 0): their
        # gradient is exactly 0 and their logits are never read.
        row_scale = tl.load(row_scale_ptr + rows, mask=in_range, other=0.0).to(acc_dtype)
        active = in_range & (row_scale != 0.0)
        stats = stats_ptr + rows * 3
        lse_s = tl.load(stats + 0, mask=active, other=0.0).to(acc_dtype)
        lse_t = tl.load(stats + 1, mask=active, other=0.0).to(acc_dtype)
        row_sum = tl.load(stats + 2, mask=active, other=0.0).to(acc_dtype)
        coefficient = -row_scale * inv_temperature
        student_rows = student_ptr + rows[:, None] * stride_student
        teacher_rows = teacher_ptr + rows[:, None] * stride_teacher
        grad_rows = grad_ptr + rows[:, None] * stride_grad
        for start in range(0, student_vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            # Columns past the shared vocabulary (a larger student) get gradient 0.
            mask = active[:, None] & (cols[None, :] < vocab)
            s = tl.load(student_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            t = tl.load(teacher_rows + cols[None, :], mask=mask, other=float("-inf")).to(acc_dtype) * inv_temperature
            log_q = s - lse_s[:, None]
            _, weight = divergence_terms(log_q, t - lse_t[:, None], log_mix_p, log_mix_q, DIVERGENCE)
            grad = coefficient[:, None] * (weight - tl.exp(log_q) * row_sum[:, None])
            tl.store(grad_rows + cols[None, :], _zero_unless(mask, grad).to(grad_ptr.dtype.element_ty),
                     mask=in_range[:, None] & (cols[None, :] < student_vocab))


def kernel_scalars(values, acc_dtype, device):
    """Float parameters travel in a tensor, not as kernel arguments: Triton passes Python floats
    as fp32, which would cap the float64 path's accuracy at ~1e-7."""
    return torch.tensor(values, dtype=acc_dtype, device=device)


def divergence_forward(student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q, ignore_index):
    """Per-row loss `[N]` and stats `[N, 3]` (lse_s, lse_t, W) in the accumulation dtype."""
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    scalars = kernel_scalars([1.0 / temperature, log_mix_p, log_mix_q], acc_dtype, student.device)
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.empty(n_rows, 3, dtype=acc_dtype, device=student.device)
    if n_rows == 0:
        return loss, stats
    shape = launch_shape(n_rows, vocab, student.device, acc_dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _divergence_forward_kernel[grid](
        student, teacher, labels if labels is not None else student, loss, stats,
        scalars, n_rows, vocab, student.stride(0), teacher.stride(0), ignore_index,
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None,
        FP64=acc_dtype == torch.float64, **shape,
    )
    return loss, stats


def divergence_backward(student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p, log_mix_q):
    """Write dL/ds into `grad` ([N, V_s], any row stride; it may be `student` itself)."""
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    if n_rows == 0:
        return grad
    scalars = kernel_scalars([1.0 / temperature, log_mix_p, log_mix_q], stats.dtype, student.device)
    shape = launch_shape(n_rows, student.shape[1], student.device, stats.dtype == torch.float64)
    grid = (triton.cdiv(n_rows, shape["BLOCK_N"]),)
    _divergence_backward_kernel[grid](
        student, teacher, stats, row_scale, grad, scalars,
        n_rows, vocab, student.shape[1], student.stride(0), teacher.stride(0), grad.stride(0),
        DIVERGENCE=DIVERGENCE_CODES[divergence], FP64=stats.dtype == torch.float64, **shape,
    )
    return grad


class DivergenceFunction(torch.autograd.Function):
    """Per-row divergence losses `[N]` of flattened logits; the gradient is recomputed in backward.

    `impl` is this module (Triton), `torch_backend` or a `VocabParallel` slice: all expose
    `divergence_forward/backward`. `active` marks the rows in the loss (the caller's, which knows
    the vocabulary the labels index).
    The reduction is left to autograd outside (a sum or a mean over `[N]`), whose incoming
    per-row gradient becomes the kernel's `row_scale`.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, active, divergence, temperature, log_mix_p, log_mix_q, ignore_index,
                impl):
        loss, stats = impl.divergence_forward(
            student, teacher, labels, divergence=divergence, temperature=temperature,
            log_mix_p=log_mix_p, log_mix_q=log_mix_q, ignore_index=ignore_index)
        ctx.save_for_backward(student, teacher, stats, active)
        ctx.params = (divergence, temperature, log_mix_p, log_mix_q, impl)
        return loss

    @staticmethod
    def backward(ctx, grad_per_row):
        student, teacher, stats, active = ctx.saved_tensors
        divergence, temperature, log_mix_p, log_mix_q, impl = ctx.params
        grad = None
        if ctx.needs_input_grad[0]:
            row_scale = torch.where(active, grad_per_row.to(stats.dtype), 0.0).contiguous()
            grad = impl.divergence_backward(
                student, teacher, stats, row_scale, torch.empty_like(student, memory_format=torch.contiguous_format),
                divergence=divergence, temperature=temperature, log_mix_p=log_mix_p, log_mix_q=log_mix_q)
        return grad, None, None, None, None, None, None, None, None, None

