"""The losses as `torch.library` custom ops, so that `torch.compile(..., fullgraph=True)` traces a
training step that calls them without graph breaks.

Each op is opaque to the compiler (a fake implementation gives it the output shapes) and carries
its own backward, wired with `register_autograd`:

- `hpd_kernels::row_losses` / `row_losses_backward`: per-row losses, stats and HPD's `y_hat`, for
  any objective (the custom-op form of `RowLosses`);
- `hpd_kernels::fused_linear`: a fused-linear loss (reduction "sum" or "mean") with its gradients
  computed in the same pass, as the eager autograd Function does; backward scales them.

An op's schema can hold only tensors and scalars, so the `Objective` and `LinearInputs` bundles
and the backend travel as their fields (`objective_fields`, the backend's `NAME`) and are rebuilt
by name on the other side. They call the very same backends as the eager path; the entry layer
takes this route when `torch.compiler.is_compiling()`.
"""

# No `from __future__ import annotations` here: torch.library infers each op's schema from the
# annotations, and real types (not strings) work with every torch release that has custom_op.
from dataclasses import astuple
from typing import Optional

import torch
from torch import Tensor

from ..registry import Objective, accumulation_dtype
from .backends import by_name
from .chunked_linear import LinearInputs, scalar_pass
from .row_losses import backward_rows, forward_rows, row_parts


def objective_fields(objective: Objective) -> tuple:
    """The op arguments `objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight,
    rkl_weight, ce_weight, cross_entropy`, in the order of `Objective`'s fields."""
    return astuple(objective)


def _named(op_arguments, inputs):
    return dict(zip(op_arguments, inputs))


# ----------------------------------------------------------------------------------------------
# Per-row losses


@torch.library.custom_op("hpd_kernels::row_losses", mutates_args=())
def row_losses(student: Tensor, teacher: Tensor, labels: Optional[Tensor], active: Tensor,
               sampled_ids: Optional[Tensor], objective: str, temperature: float, ignore_index: int, log_mix_p: float,
               log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float, ce_weight: float,
               cross_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(loss, distillation, cross_entropy, stats, y_hat)` per row (`forward_rows`'s `Rows`)."""
    spec = Objective(objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight, rkl_weight,
                     ce_weight, cross_entropy)
    rows = forward_rows(by_name(backend), student, teacher, labels, sampled_ids, spec)
    drawn = rows.sampled_ids
    if drawn is None:
        drawn = student.new_empty((0,), dtype=torch.int64)
    elif sampled_ids is not None:
        drawn = drawn.clone()  # outputs may not alias inputs (nor one another)
    return (rows.loss, *row_parts(rows, rows.loss.new_empty((0,))), rows.stats, drawn)


_ROW_ARGUMENTS = ("student", "teacher", "labels", "active", "sampled_ids", "objective", "temperature", "ignore_index",
                  "log_mix_p", "log_mix_q", "seed", "fkl_weight", "rkl_weight", "ce_weight", "cross_entropy", "backend")


@row_losses.register_fake
def _(*inputs):
    named = _named(_ROW_ARGUMENTS, inputs)
    student = named["student"]
    rows, acc_dtype = student.shape[0], accumulation_dtype(student.dtype)
    shape = Objective(named["objective"], 1.0, 0)  # only its name matters here
    per_row = lambda: student.new_empty((rows,), dtype=acc_dtype)  # noqa: E731
    part = (per_row if named["cross_entropy"] and named["labels"] is not None
            else lambda: student.new_empty((0,), dtype=acc_dtype))  # noqa: E731
    return (per_row(), part(), part(), student.new_empty((rows, shape.stats_columns), dtype=acc_dtype),
            student.new_empty((rows,) if shape.is_hybrid else (0,), dtype=torch.int64))


@torch.library.custom_op("hpd_kernels::row_losses_backward", mutates_args=())
def row_losses_backward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], sampled_ids: Tensor,
                        stats: Tensor, row_scale: Tensor, objective: str, temperature: float, ignore_index: int,
                        log_mix_p: float, log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float,
                        ce_weight: float, cross_entropy: bool, backend: str) -> Tensor:
    spec = Objective(objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight, rkl_weight,
                     ce_weight, cross_entropy)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    vocab = min(student.shape[1], teacher.shape[1])
    return backward_rows(by_name(backend), student, teacher, labels, sampled_ids, stats, row_scale.contiguous(), grad,
                         spec, vocab)


@row_losses_backward.register_fake
def _(student, *_):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _row_losses_setup(ctx, inputs, output):
    named = _named(_ROW_ARGUMENTS, inputs)
    *_, stats, drawn = output
    sampled_ids = drawn if named["sampled_ids"] is None else named["sampled_ids"]
    ctx.save_for_backward(named["student"], named["teacher"], named["labels"], sampled_ids, stats, named["active"])
    ctx.scalars = tuple(named[name] for name in _ROW_ARGUMENTS[5:])


def _row_losses_backward(ctx, grad_loss, *_):
    student, teacher, labels, sampled_ids, stats, active = ctx.saved_tensors
    row_scale = torch.where(active, grad_loss.to(stats.dtype), torch.zeros_like(stats[:, 0]))
    grad = row_losses_backward(student, teacher, labels, sampled_ids, stats, row_scale, *ctx.scalars)
    return (grad,) + (None,) * (len(_ROW_ARGUMENTS) - 1)


row_losses.register_autograd(_row_losses_backward, setup_context=_row_losses_setup)


# ----------------------------------------------------------------------------------------------
# Fused linear


@torch.library.custom_op("hpd_kernels::fused_linear", mutates_args=())
def fused_linear(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], labels: Optional[Tensor], sampled_ids: Optional[Tensor],
                 active: Tensor, objective: str, temperature: float, ignore_index: int, log_mix_p: float,
                 log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float, ce_weight: float,
                 cross_entropy: bool, reduction: str, chunk_size: int, backend: str, want_hidden: bool,
                 want_weight: bool, want_bias: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(loss, distillation, cross_entropy, y_hat, w_y, w_hat, grad_hidden, grad_weight, grad_bias)`."""
    inputs = LinearInputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          teacher_logits, labels, sampled_ids)
    spec = Objective(objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight, rkl_weight,
                     ce_weight, cross_entropy)
    acc_dtype = accumulation_dtype(student_hidden.dtype)
    want = (want_hidden, want_weight, want_bias and student_bias is not None)
    loss, details, parts, grads = scalar_pass(inputs, active, spec, by_name(backend), chunk_size, reduction, want)

    def empty(dtype=student_hidden.dtype):  # a fresh tensor each: outputs may not alias one another
        return student_hidden.new_empty((0,), dtype=dtype)

    if spec.is_hybrid:
        drawn, w_label, w_sample = details
        drawn = drawn.clone() if sampled_ids is not None else drawn
    else:
        drawn, w_label, w_sample = empty(torch.int64), empty(acc_dtype), empty(acc_dtype)
    distillation, hard = parts if parts is not None else (empty(acc_dtype), empty(acc_dtype))
    grad_hidden, grad_weight, grad_bias = grads
    return (loss, distillation, hard, drawn, w_label, w_sample,
            grad_hidden if grad_hidden is not None else empty(),
            grad_weight.to(student_weight.dtype) if grad_weight is not None else empty(),
            grad_bias.to(student_bias.dtype) if grad_bias is not None else empty())


_FUSED_ARGUMENTS = LinearInputs._fields + (
    "active", "objective", "temperature", "ignore_index", "log_mix_p", "log_mix_q", "seed", "fkl_weight",
    "rkl_weight", "ce_weight", "cross_entropy", "reduction", "chunk_size", "backend", "want_hidden", "want_weight", "want_bias")


@fused_linear.register_fake
def _(*inputs):
    named = _named(_FUSED_ARGUMENTS, inputs)
    hidden, weight, bias = named["student_hidden"], named["student_weight"], named["student_bias"]
    acc_dtype, rows = accumulation_dtype(hidden.dtype), hidden.shape[0]
    empty = hidden.new_empty((0,))
    hpd = Objective(named["objective"], 1.0, 0).is_hybrid
    parts = named["cross_entropy"] and named["labels"] is not None
    part = lambda: hidden.new_empty((rows,) if parts else (0,), dtype=acc_dtype)  # noqa: E731
    return (hidden.new_empty((), dtype=acc_dtype), part(), part(),
            hidden.new_empty((rows,), dtype=torch.int64) if hpd else empty.long(),
            hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
            hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
            torch.empty_like(hidden) if named["want_hidden"] else empty,
            torch.empty_like(weight) if named["want_weight"] else empty,
            torch.empty_like(bias) if named["want_bias"] and bias is not None else empty)


def _fused_setup(ctx, inputs, output):
    named = _named(_FUSED_ARGUMENTS, inputs)
    ctx.wants = (named["want_hidden"], named["want_weight"], named["want_bias"] and named["student_bias"] is not None)
    ctx.save_for_backward(*output[6:])


def _fused_backward(ctx, grad_loss, *_):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    scaled = [grad * grad_loss.to(grad.dtype) if want else None
              for grad, want in zip((grad_hidden, grad_weight, grad_bias), ctx.wants)]
    return (*scaled,) + (None,) * (len(_FUSED_ARGUMENTS) - 3)


fused_linear.register_autograd(_fused_backward, setup_context=_fused_setup)
