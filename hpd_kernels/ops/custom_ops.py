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
by name on the other side; an op's signature is its schema, so its arguments are read by the names
of that signature, and its tuple of results is named by `RowLossesOutputs` / `FusedLinearOutputs`.
Callers use `run_row_losses` and `run_fused_linear`, which take the bundles and return the named
results. They call the very same backends as the eager path; the entry layer takes this route
when `torch.compiler.is_compiling()`.
"""

# No `from __future__ import annotations` here: torch.library infers each op's schema from the
# annotations, and real types (not strings) work with every torch release that has custom_op.
import inspect
from dataclasses import astuple, fields
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..registry import Objective, accumulation_dtype
from .backend_contract import Backend
from .backends import by_name
from .chunked_linear import LinearInputs, StudentGrads, scalar_pass
from .row_losses import backward_rows, forward_rows, row_parts


class RowLossesOutputs(NamedTuple):
    """The results of `hpd_kernels::row_losses`, per row: `forward_rows`'s `RowForward`, the parts
    empty unless asked for and `sampled_ids` empty for the divergences."""

    loss: Tensor
    distillation: Tensor
    cross_entropy: Tensor
    stats: Tensor
    sampled_ids: Tensor
    entropy: Tensor


class FusedLinearOutputs(NamedTuple):
    """The results of `hpd_kernels::fused_linear`: the reduced loss, the parts and HPD's details per
    row (empty where not computed) and the gradients (empty where not wanted)."""

    loss: Tensor
    distillation: Tensor
    cross_entropy: Tensor
    sampled_ids: Tensor
    label_weight: Tensor
    sample_weight: Tensor
    entropy: Tensor
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor


def objective_fields(objective: Objective) -> tuple:
    """The op arguments `objective, temperature, ignore_index, log_mix_p, log_mix_q, seed, fkl_weight,
    rkl_weight, ce_weight, cross_entropy, student_scale, student_softcap, teacher_scale,
    teacher_softcap, entropy`, in the order of `Objective`'s fields."""
    return astuple(objective)


def _objective(named) -> Objective:
    """The `Objective` an op's arguments carry, by name (its `name` is the argument `objective`)."""
    return Objective(named["objective"], **{field.name: named[field.name] for field in fields(Objective)
                                            if field.name != "name"})


def _arguments(op_function) -> tuple:
    return tuple(inspect.signature(op_function).parameters)


def _named(op_arguments, inputs):
    return dict(zip(op_arguments, inputs))


# ----------------------------------------------------------------------------------------------
# Per-row losses


def _row_losses(student: Tensor, teacher: Tensor, labels: Optional[Tensor], active: Tensor,
                sampled_ids: Optional[Tensor], objective: str, temperature: float, ignore_index: int, log_mix_p: float,
                log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float, ce_weight: float,
                cross_entropy: bool, student_scale: float, student_softcap: float, teacher_scale: float,
                teacher_softcap: float, entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                               Tensor]:
    """`RowLossesOutputs`."""
    forward = forward_rows(by_name(backend), student, teacher, labels, sampled_ids, _objective(locals()))
    drawn = forward.sampled_ids
    if drawn is None:
        drawn = student.new_empty((0,), dtype=torch.int64)
    elif sampled_ids is not None:
        drawn = drawn.clone()  # outputs may not alias inputs (nor one another)
    parts = row_parts(forward, forward.loss.new_empty((0,)))
    computed_entropy = forward.entropy if forward.entropy is not None else forward.loss.new_empty((0,))
    return tuple(RowLossesOutputs(forward.loss, parts.distillation, parts.cross_entropy, forward.stats, drawn,
                                  computed_entropy))


row_losses = torch.library.custom_op("hpd_kernels::row_losses", _row_losses, mutates_args=())
_ROW_ARGUMENTS = _arguments(_row_losses)


@row_losses.register_fake
def _(*inputs):
    named = _named(_ROW_ARGUMENTS, inputs)
    student = named["student"]
    rows, acc_dtype = student.shape[0], accumulation_dtype(student.dtype)
    objective = _objective(named)
    per_row = lambda: student.new_empty((rows,), dtype=acc_dtype)  # noqa: E731
    part = (per_row if named["cross_entropy"] and named["labels"] is not None
            else lambda: student.new_empty((0,), dtype=acc_dtype))  # noqa: E731
    return tuple(RowLossesOutputs(
        per_row(), part(), part(), student.new_empty((rows, objective.stats_columns), dtype=acc_dtype),
        student.new_empty((rows,) if objective.is_hybrid else (0,), dtype=torch.int64),
        student.new_empty((rows,) if objective.entropy else (0,), dtype=acc_dtype)))


def _row_losses_backward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], sampled_ids: Tensor,
                         stats: Tensor, row_scale: Tensor, objective: str, temperature: float, ignore_index: int,
                         log_mix_p: float, log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float,
                         ce_weight: float, cross_entropy: bool, student_scale: float, student_softcap: float,
                         teacher_scale: float, teacher_softcap: float, entropy: bool, backend: str) -> Tensor:
    spec = _objective(locals())
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    vocab = min(student.shape[1], teacher.shape[1])
    return backward_rows(by_name(backend), student, teacher, labels, sampled_ids, stats, row_scale.contiguous(), grad,
                         spec, vocab)


row_losses_backward = torch.library.custom_op("hpd_kernels::row_losses_backward", _row_losses_backward,
                                              mutates_args=())
_ROW_BACKWARD_ARGUMENTS = _arguments(_row_losses_backward)
# The arguments the backward op takes as the forward op was given them.
_ROW_SCALARS = ("objective",) + tuple(field.name for field in fields(Objective) if field.name != "name") + ("backend",)


@row_losses_backward.register_fake
def _(student, *_):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _row_losses_setup(ctx, inputs, output):
    named, outputs = _named(_ROW_ARGUMENTS, inputs), RowLossesOutputs(*output)
    sampled_ids = outputs.sampled_ids if named["sampled_ids"] is None else named["sampled_ids"]
    ctx.save_for_backward(named["student"], named["teacher"], named["labels"], sampled_ids, outputs.stats,
                          named["active"])
    ctx.scalars = {name: named[name] for name in _ROW_SCALARS}


def _row_losses_grad(ctx, grad_loss, *_):
    student, teacher, labels, sampled_ids, stats, active = ctx.saved_tensors
    row_scale = torch.where(active, grad_loss.to(stats.dtype), torch.zeros_like(stats[:, 0]))
    named = dict(ctx.scalars, student=student, teacher=teacher, labels=labels, sampled_ids=sampled_ids, stats=stats,
                 row_scale=row_scale)
    grad = row_losses_backward(*(named[name] for name in _ROW_BACKWARD_ARGUMENTS))
    return tuple(grad if name == "student" else None for name in _ROW_ARGUMENTS)


row_losses.register_autograd(_row_losses_grad, setup_context=_row_losses_setup)


def run_row_losses(student, teacher, labels, active, sampled_ids, objective: Objective,
                   backend: Backend) -> RowLossesOutputs:
    return RowLossesOutputs(*row_losses(student, teacher, labels, active, sampled_ids, *objective_fields(objective),
                                        backend.NAME))


# ----------------------------------------------------------------------------------------------
# Fused linear


def _fused_linear(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                  teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                  teacher_logits: Optional[Tensor], labels: Optional[Tensor], sampled_ids: Optional[Tensor],
                  active: Tensor, objective: str, temperature: float, ignore_index: int, log_mix_p: float,
                  log_mix_q: float, seed: int, fkl_weight: float, rkl_weight: float, ce_weight: float,
                  cross_entropy: bool, student_scale: float, student_softcap: float, teacher_scale: float,
                  teacher_softcap: float, entropy: bool, reduction: str, chunk_size: int, backend: str,
                  want_hidden: bool, want_weight: bool, want_bias: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`FusedLinearOutputs`."""
    named = dict(locals())
    inputs = LinearInputs(**{name: named[name] for name in LinearInputs._fields})
    spec = _objective(named)
    acc_dtype = accumulation_dtype(student_hidden.dtype)
    wanted = StudentGrads(want_hidden, want_weight, want_bias and student_bias is not None)
    loss, details, parts, grads, per_row_entropy = scalar_pass(inputs, active, spec, by_name(backend), chunk_size,
                                                               reduction, wanted)

    def empty(dtype=student_hidden.dtype):  # a fresh tensor each: outputs may not alias one another
        return student_hidden.new_empty((0,), dtype=dtype)

    if spec.is_hybrid:
        drawn, w_label, w_sample = details
        drawn = drawn.clone() if sampled_ids is not None else drawn
    else:
        drawn, w_label, w_sample = empty(torch.int64), empty(acc_dtype), empty(acc_dtype)
    distillation, hard = parts if parts is not None else (empty(acc_dtype), empty(acc_dtype))
    return tuple(FusedLinearOutputs(
        loss, distillation, hard, drawn, w_label, w_sample,
        per_row_entropy if per_row_entropy is not None else empty(acc_dtype),
        grads.hidden if grads.hidden is not None else empty(),
        grads.weight.to(student_weight.dtype) if grads.weight is not None else empty(),
        grads.bias.to(student_bias.dtype) if grads.bias is not None else empty()))


fused_linear = torch.library.custom_op("hpd_kernels::fused_linear", _fused_linear, mutates_args=())
_FUSED_ARGUMENTS = _arguments(_fused_linear)


@fused_linear.register_fake
def _(*inputs):
    named = _named(_FUSED_ARGUMENTS, inputs)
    hidden, weight, bias = named["student_hidden"], named["student_weight"], named["student_bias"]
    acc_dtype, rows = accumulation_dtype(hidden.dtype), hidden.shape[0]
    empty = hidden.new_empty((0,))
    hpd = _objective(named).is_hybrid
    parts = named["cross_entropy"] and named["labels"] is not None
    part = lambda: hidden.new_empty((rows,) if parts else (0,), dtype=acc_dtype)  # noqa: E731
    return tuple(FusedLinearOutputs(
        hidden.new_empty((), dtype=acc_dtype), part(), part(),
        hidden.new_empty((rows,), dtype=torch.int64) if hpd else empty.long(),
        hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
        hidden.new_empty((rows,), dtype=acc_dtype) if hpd else empty.to(acc_dtype),
        hidden.new_empty((rows,) if named["entropy"] else (0,), dtype=acc_dtype),
        torch.empty_like(hidden) if named["want_hidden"] else empty,
        torch.empty_like(weight) if named["want_weight"] else empty,
        torch.empty_like(bias) if named["want_bias"] and bias is not None else empty))


def _fused_setup(ctx, inputs, output):
    named, outputs = _named(_FUSED_ARGUMENTS, inputs), FusedLinearOutputs(*output)
    ctx.wanted = StudentGrads(named["want_hidden"], named["want_weight"],
                              named["want_bias"] and named["student_bias"] is not None)
    ctx.save_for_backward(outputs.grad_hidden, outputs.grad_weight, outputs.grad_bias)


def _fused_grad(ctx, grad_loss, *_):
    saved = StudentGrads(*ctx.saved_tensors)
    scaled = StudentGrads(*(grad * grad_loss.to(grad.dtype) if wanted else None
                            for grad, wanted in zip(saved, ctx.wanted)))
    grads = dict(student_hidden=scaled.hidden, student_weight=scaled.weight, student_bias=scaled.bias)
    return tuple(grads.get(name) for name in _FUSED_ARGUMENTS)


fused_linear.register_autograd(_fused_grad, setup_context=_fused_setup)


def run_fused_linear(inputs: LinearInputs, active, objective: Objective, reduction: str, chunk_size: int,
                     backend: Backend, wanted: StudentGrads) -> FusedLinearOutputs:
    return FusedLinearOutputs(*fused_linear(*inputs, active, *objective_fields(objective), reduction, chunk_size,
                                            backend.NAME, *wanted))
