"""The losses as `torch.library` custom ops, so that `torch.compile(..., fullgraph=True)` traces a
training step that calls them without graph breaks.

Each op is opaque to the compiler (a fake implementation gives it the output shapes) and carries
its own backward op, wired with `register_autograd`:

- `hpd_kernels::divergence_rows` / `divergence_rows_backward`: per-row divergence losses and stats;
- `hpd_kernels::hybrid_rows` / `hybrid_rows_backward`: HPD per-row losses, stats and `y_hat`;
- `hpd_kernels::fused_linear`: a fused-linear loss (reduction "sum" or "mean") with its gradients
  computed in the same pass, as the eager autograd Function does; backward scales them.

They call the very same Triton or torch implementations as the eager path; the public functions
take this route when `torch.compiler.is_compiling()`.
"""

# No `from __future__ import annotations` here: torch.library infers each op's schema from the
# annotations, and real types (not strings) work with every torch release that has custom_op.
from typing import Optional

import torch
from torch import Tensor

from . import divergence as triton_divergence
from . import hybrid as triton_hybrid
from . import torch_backend
from .common import DIVERGENCE_STATS, HYBRID_STATS
from .fused_linear import Objective, scalar_pass


def _acc(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _impl(backend, triton_module):
    return triton_module if backend == "triton" else torch_backend


# ----------------------------------------------------------------------------------------------
# Divergences


@torch.library.custom_op("hpd_kernels::divergence_rows", mutates_args=())
def divergence_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], active: Tensor, divergence: str,
                    temperature: float, log_mix_p: float, log_mix_q: float, ignore_index: int,
                    backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, triton_divergence).divergence_forward(
        student, teacher, labels, divergence=divergence, temperature=temperature, log_mix_p=log_mix_p,
        log_mix_q=log_mix_q, ignore_index=ignore_index)


@divergence_rows.register_fake
def _(student, teacher, labels, active, divergence, temperature, log_mix_p, log_mix_q, ignore_index, backend):
    rows = student.shape[0]
    return (student.new_empty((rows,), dtype=_acc(student)),
            student.new_empty((rows, DIVERGENCE_STATS), dtype=_acc(student)))


@torch.library.custom_op("hpd_kernels::divergence_rows_backward", mutates_args=())
def divergence_rows_backward(student: Tensor, teacher: Tensor, stats: Tensor, row_scale: Tensor, divergence: str,
                             temperature: float, log_mix_p: float, log_mix_q: float, backend: str) -> Tensor:
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return _impl(backend, triton_divergence).divergence_backward(
        student, teacher, stats, row_scale.contiguous(), grad, divergence=divergence, temperature=temperature,
        log_mix_p=log_mix_p, log_mix_q=log_mix_q)


@divergence_rows_backward.register_fake
def _(student, teacher, stats, row_scale, divergence, temperature, log_mix_p, log_mix_q, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _divergence_setup(ctx, inputs, output):
    student, teacher, _, active, divergence, temperature, log_mix_p, log_mix_q, _, backend = inputs
    ctx.save_for_backward(student, teacher, output[1], active)
    ctx.params = (divergence, temperature, log_mix_p, log_mix_q, backend)


def _divergence_backward(ctx, grad_loss, _grad_stats):
    student, teacher, stats, active = ctx.saved_tensors
    divergence, temperature, log_mix_p, log_mix_q, backend = ctx.params
    row_scale = torch.where(active, grad_loss.to(stats.dtype), torch.zeros_like(stats[:, 0]))
    grad = divergence_rows_backward(student, teacher, stats, row_scale, divergence, temperature, log_mix_p,
                                    log_mix_q, backend)
    return grad, None, None, None, None, None, None, None, None, None


divergence_rows.register_autograd(_divergence_backward, setup_context=_divergence_setup)


# ----------------------------------------------------------------------------------------------
# HPD


@torch.library.custom_op("hpd_kernels::hybrid_rows", mutates_args=())
def hybrid_rows(student: Tensor, teacher: Tensor, labels: Tensor, active: Tensor, sampled_ids: Optional[Tensor],
                seed: int, temperature: float, fkl_weight: float, rkl_weight: float, ignore_index: int,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    loss, stats, ids = _impl(backend, triton_hybrid).hybrid_forward(
        student, teacher, labels, sampled_ids, seed=seed, temperature=temperature, fkl_weight=fkl_weight,
        rkl_weight=rkl_weight, ignore_index=ignore_index)
    return loss, stats, ids.clone() if sampled_ids is not None else ids  # outputs may not alias inputs


@hybrid_rows.register_fake
def _(student, teacher, labels, active, sampled_ids, seed, temperature, fkl_weight, rkl_weight, ignore_index,
      backend):
    rows = student.shape[0]
    return (student.new_empty((rows,), dtype=_acc(student)), student.new_empty((rows, HYBRID_STATS), dtype=_acc(student)),
            student.new_empty((rows,), dtype=torch.int64))


@torch.library.custom_op("hpd_kernels::hybrid_rows_backward", mutates_args=())
def hybrid_rows_backward(student: Tensor, labels: Tensor, sampled_ids: Tensor, stats: Tensor, row_scale: Tensor,
                         vocab: int, temperature: float, backend: str) -> Tensor:
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return _impl(backend, triton_hybrid).hybrid_backward(student, labels, sampled_ids, stats, row_scale.contiguous(),
                                                          grad, vocab=vocab, temperature=temperature)


@hybrid_rows_backward.register_fake
def _(student, labels, sampled_ids, stats, row_scale, vocab, temperature, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _hybrid_setup(ctx, inputs, output):
    student, teacher, labels, active, _, _, temperature, _, _, _, backend = inputs
    vocab = min(student.shape[1], teacher.shape[1])
    ctx.save_for_backward(student, labels, output[2], output[1], active)
    ctx.params = (vocab, temperature, backend)


def _hybrid_backward(ctx, grad_loss, _grad_stats, _grad_ids):
    student, labels, ids, stats, active = ctx.saved_tensors
    vocab, temperature, backend = ctx.params
    row_scale = torch.where(active, grad_loss.to(stats.dtype), torch.zeros_like(stats[:, 0]))
    grad = hybrid_rows_backward(student, labels, ids, stats, row_scale, vocab, temperature, backend)
    return grad, None, None, None, None, None, None, None, None, None, None


hybrid_rows.register_autograd(_hybrid_backward, setup_context=_hybrid_setup)


# ----------------------------------------------------------------------------------------------
# Fused linear


@torch.library.custom_op("hpd_kernels::fused_linear", mutates_args=())
def fused_linear(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], labels: Optional[Tensor], sampled_ids: Optional[Tensor],
                 active: Tensor, objective: str, temperature: float, ignore_index: int, log_mix_p: float,
                 log_mix_q: float, seed: int,
                 fkl_weight: float, rkl_weight: float, reduction: str, chunk_size: int, backend: str,
                 want_hidden: bool, want_weight: bool, want_bias: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = Objective(objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight, rkl_weight)
    hpd = objective == "hpd"
    impl = _impl(backend, triton_hybrid if hpd else triton_divergence)
    acc_dtype = _acc(student_hidden)
    want = (want_hidden, want_weight, want_bias and student_bias is not None)
    inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              teacher_logits, labels, sampled_ids)
    loss, details, grads = scalar_pass(inputs, active, spec, impl, chunk_size, reduction, want)

    def empty(dtype=student_hidden.dtype):  # a fresh tensor each: outputs may not alias one another
        return student_hidden.new_empty((0,), dtype=dtype)

    if hpd:
        drawn, w_label, w_sample = details
        drawn = drawn.clone() if sampled_ids is not None else drawn
    else:
        drawn, w_label, w_sample = empty(torch.int64), empty(acc_dtype), empty(acc_dtype)
    grad_hidden, grad_weight, grad_bias = grads
    return (loss, drawn, w_label, w_sample,
            grad_hidden if grad_hidden is not None else empty(),
            grad_weight.to(student_weight.dtype) if grad_weight is not None else empty(),
            grad_bias.to(student_bias.dtype) if grad_bias is not None else empty())


@fused_linear.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
      labels, sampled_ids, active, objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight,
      rkl_weight, reduction, chunk_size, backend, want_hidden, want_weight, want_bias):
    acc_dtype, rows = _acc(student_hidden), student_hidden.shape[0]
    empty = student_hidden.new_empty((0,))
    hpd = objective == "hpd"
    return (student_hidden.new_empty((), dtype=acc_dtype),
            student_hidden.new_empty((rows,), dtype=torch.int64) if hpd else empty.long(),
            student_hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
            student_hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
            torch.empty_like(student_hidden) if want_hidden else empty,
            torch.empty_like(student_weight) if want_weight else empty,
            torch.empty_like(student_bias) if want_bias and student_bias is not None else empty)


def _fused_setup(ctx, inputs, output):
    ctx.wants = (inputs[21], inputs[22], inputs[23] and inputs[2] is not None)
    ctx.save_for_backward(*output[4:])


def _fused_backward(ctx, grad_loss, *_):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    scaled = [grad * grad_loss.to(grad.dtype) if want else None
              for grad, want in zip((grad_hidden, grad_weight, grad_bias), ctx.wants)]
    return (*scaled,) + (None,) * 21


fused_linear.register_autograd(_fused_backward, setup_context=_fused_setup)
