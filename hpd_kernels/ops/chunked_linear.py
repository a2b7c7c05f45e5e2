"""Fused lm_head + distillation loss: the logits exist only one chunk of rows at a time.

Only the rows in the loss are chunked: rows outside it (prompt, padding, ignored labels), wherever
they lie, cost no GEMM and no backend call, and keep zero losses and gradients (`_loss_row_chunks`).

Per chunk of tokens: `student_logits = h_s W_s^T (+ b_s)` and the teacher's logits are computed in
the input dtype, the loss kernels (Triton or torch, the same ones the logits-level losses use)
reduce them to per-row values, the backward kernel overwrites the student's chunk logits with their
own gradient, and that gradient is immediately contracted into `dL/dh_s` (rows of this chunk) and
accumulated into `dL/dW_s`, `dL/db_s` (float32). Peak memory is then one chunk of student and
teacher logits plus the weight gradient, instead of several `[N, V]` tensors. On CUDA the
`dL/dW_s` GEMM takes the chunk's fp16/bf16 operands as they are and accumulates in float32
(`accumulate_mm`): no float32 copy of a chunk, and the tensor cores' rate for the step's largest GEMM.

With a scalar reduction ("mean"/"sum") the gradients are computed during the forward (the
incoming gradient of a scalar loss only rescales them), so the logits are built once. With
`reduction="none"` the per-row incoming gradient is not known until backward, which then rebuilds
the logits chunk by chunk.

Chunk size rule (`rows_per_chunk`): as many rows as fit a memory budget for the chunk's student and
teacher logits, `budget // ((V_s + V_t) * itemsize)`, rounded down to a multiple of 64 rows on a
GPU (whole GEMM tiles). The budget is 32 MiB on the CPU and 1/32 of the free GPU memory (clamped to
[256 MiB, 2 GiB]) on CUDA.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import torch

from ..registry import Objective, accumulation_dtype
from .backend_contract import Backend
from .row_losses import HpdDetails, RowParts, backward_rows, forward_rows, hybrid_details, no_details


CPU_CHUNK_BUDGET = 32 * 2**20


class LinearInputs(NamedTuple):
    """The tensors of a fused-linear loss, flattened to rows: the student's hidden states and lm_head,
    the teacher's (or its precomputed logits), labels and given `y_hat` (each may be None but the
    student's hidden states and weight)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    sampled_ids: Optional[torch.Tensor] = None


class StudentGrads(NamedTuple):
    """One thing per student tensor that takes a gradient: whether it is wanted (bools), or the
    gradient itself (None where not wanted)."""

    hidden: Any
    weight: Any
    bias: Any


NO_GRADS = StudentGrads(False, False, False)


class LinearPass(NamedTuple):
    """What a pass over the rows computed: the loss (per row, or reduced by `scalar_pass`), HPD's
    details and the two parts per row (None unless computed), the gradients asked for and the
    student's entropy per row (None unless asked for)."""

    loss: torch.Tensor
    details: Optional[HpdDetails]
    parts: Optional[RowParts]
    grads: StudentGrads
    entropy: Optional[torch.Tensor] = None


def rows_per_chunk(n_rows: int, student_vocab: int, teacher_vocab: int, itemsize: int, device: torch.device) -> int:
    if device.type == "cuda" and torch.compiler.is_compiling():
        budget = 512 * 2**20  # a fixed budget: the free memory cannot be read inside a graph
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 32, 256 * 2**20), 2 * 2**30)
    else:
        budget = CPU_CHUNK_BUDGET
    rows = max(1, budget // max(1, (student_vocab + teacher_vocab) * itemsize))
    if device.type == "cuda" and rows > 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


@functools.cache
def _cuda_addmm_accumulates_in_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's CUDA `addmm` adds `dtype` operands into a float32 `self` and `out`: tried
    once per device and dtype, since older releases lack the `out_dtype` overload and some that
    have it refuse a float32 `self` (pytorch#167931)."""
    accumulator = torch.zeros(1, 1, device=device)
    operand = torch.ones(1, 1, device=device, dtype=dtype)
    try:
        torch.addmm(accumulator, operand, operand, out_dtype=torch.float32, out=accumulator)
    except (RuntimeError, TypeError):  # TypeError: no `out_dtype` argument at all
        return False
    return True


def half_operand_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """The rule of `accumulate_mm`: on CUDA, fp16/bf16 operands go to the GEMM as they are and cuBLAS
    accumulates them in float32; elsewhere (the CPU has no such kernel) they are upcast first."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _cuda_addmm_accumulates_in_float32(device, dtype))


def accumulate_mm(accumulator, mat1, mat2):
    """`accumulator += mat1 @ mat2` in place; `accumulator` is float32 (float64 for float64 operands)."""
    if mat1.dtype == mat2.dtype != accumulator.dtype and half_operand_gemm(mat1.device, mat1.dtype):
        torch.addmm(accumulator, mat1, mat2, out_dtype=accumulator.dtype, out=accumulator)
    else:  # upcasts the chunk's (small) operands; never a [V, H] temporary
        accumulator.addmm_(mat1.to(accumulator.dtype), mat2.to(accumulator.dtype))


def _linear(hidden, weight, bias):
    return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


def _loss_row_chunks(active, chunk_size):
    """The rows in the loss, `chunk_size` at a time: slices where every row is (nothing to gather),
    else their original indices. Rows outside it (prompt, padding, ignored labels) are never
    projected, wherever they lie. Finding them waits for the device once per call; under
    vocabulary parallelism every rank holds the same labels, so all cut the same chunks."""
    n_rows = active.shape[0]
    loss_rows = torch.nonzero(active)[:, 0]
    if loss_rows.numel() == n_rows:
        return [slice(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]
    return list(loss_rows.split(chunk_size)) if loss_rows.numel() else []


def _row_ids(rows, device):
    """The original indices of a chunk's rows: HPD's noise is keyed by them, so a row draws the same
    `y_hat` whichever rows are left out around it."""
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


class _Chunks:
    """One pass over the rows in the loss (`active`): per-row losses, and gradients when `row_scale`
    is given; rows outside the loss keep zero losses and gradients (and `ignore_index` ids)."""

    def __init__(self, inputs: LinearInputs, active, objective: Objective, backend: Backend, chunk_size: int):
        self.inputs, self.active, self.objective = inputs, active, objective
        self.backend, self.chunk_size = backend, chunk_size

    def teacher_chunk(self, rows):
        inputs = self.inputs
        if inputs.teacher_logits is not None:
            return inputs.teacher_logits[rows]
        return _linear(inputs.teacher_hidden[rows], inputs.teacher_weight, inputs.teacher_bias)

    def run(self, row_scale=None, wanted: StudentGrads = NO_GRADS) -> LinearPass:
        inputs, objective = self.inputs, self.objective
        hidden, weight, bias = inputs.student_hidden, inputs.student_weight, inputs.student_bias
        n_rows, device = hidden.shape[0], hidden.device
        acc_dtype = accumulation_dtype(hidden.dtype)
        per_row = torch.zeros(n_rows, dtype=acc_dtype, device=device)
        # The two parts, when the hard-label term is asked for (else the loss is the distillation part).
        distillation = torch.zeros_like(per_row) if objective.cross_entropy else None
        cross_entropy = torch.zeros_like(per_row) if objective.cross_entropy else None
        hpd = objective.is_hybrid
        drawn = torch.full((n_rows,), objective.ignore_index, dtype=torch.int64, device=device) if hpd else None
        label_weight = torch.zeros(n_rows, dtype=acc_dtype, device=device) if hpd else None
        sample_weight = torch.zeros_like(label_weight) if hpd else None
        entropy = torch.zeros_like(per_row) if objective.entropy else None
        loss_row_chunks = _loss_row_chunks(self.active, self.chunk_size)
        # (No chunk at all, every row ignored, is not "every row": `all([])` would leave grad_hidden unwritten.)
        every_row = bool(loss_row_chunks) and all(isinstance(rows, slice) for rows in loss_row_chunks)
        # Every row in a chunk: each is written once (below), so nothing needs zeroing first.
        grad_hidden = None
        if wanted.hidden:
            grad_hidden = torch.empty_like(hidden) if every_row and row_scale is not None else torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if wanted.weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if wanted.bias else None

        for rows in loss_row_chunks:
            chunk_hidden = hidden[rows]
            student_logits = _linear(chunk_hidden, weight, bias)
            teacher_logits = self.teacher_chunk(rows)
            labels = None if inputs.labels is None else inputs.labels[rows]
            given = None if inputs.sampled_ids is None else inputs.sampled_ids[rows]
            chunk = forward_rows(self.backend, student_logits, teacher_logits, labels, given, objective,
                                 row_ids=_row_ids(rows, device) if hpd and given is None else None)
            stats, ids = chunk.stats, chunk.sampled_ids
            if hpd:
                drawn[rows], label_weight[rows], sample_weight[rows] = hybrid_details(stats, ids)
            per_row[rows] = chunk.loss
            if entropy is not None:
                entropy[rows] = chunk.entropy
            if cross_entropy is not None and chunk.cross_entropy is not None:
                distillation[rows], cross_entropy[rows] = chunk.distillation, chunk.cross_entropy
            if row_scale is None:
                continue

            # The chunk's logits become their own gradient, in place: no second [rows, V] buffer.
            vocab = min(student_logits.shape[1], teacher_logits.shape[1])
            backward_rows(self.backend, student_logits, teacher_logits, labels, ids, stats,
                          row_scale[rows].contiguous(), student_logits, objective, vocab)
            grad_logits = student_logits
            if grad_hidden is not None and isinstance(rows, slice):
                torch.mm(grad_logits, weight, out=grad_hidden[rows])  # a view: no temporary
            elif grad_hidden is not None:
                grad_hidden[rows] = torch.mm(grad_logits, weight)
            if grad_weight is not None:
                accumulate_mm(grad_weight, grad_logits.t(), chunk_hidden)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc_dtype)
        if grad_hidden is not None:
            self.backend.reduce_hidden_grad(grad_hidden)  # vocabulary-parallel: sum over the slices
        details = HpdDetails(drawn, label_weight, sample_weight) if hpd else None
        parts = RowParts(distillation, cross_entropy) if cross_entropy is not None else None
        return LinearPass(per_row, details, parts, StudentGrads(grad_hidden, grad_weight, grad_bias), entropy)


def scalar_pass(inputs: LinearInputs, active, objective: Objective, backend: Backend, chunk_size, reduction,
                wanted: StudentGrads) -> LinearPass:
    """A scalar reduction ("mean" over the `active` rows, or "sum") in one pass: the gradients
    `wanted` are computed while each chunk's logits exist. The parts (per-row distillation and
    cross-entropy, when asked) are left unreduced."""
    acc_dtype = accumulation_dtype(inputs.student_hidden.dtype)
    denominator = active.sum().clamp(min=1).to(acc_dtype)
    row_scale = None
    if any(wanted):
        row_scale = active.to(acc_dtype) / denominator if reduction == "mean" else active.to(acc_dtype)
    computed = _Chunks(inputs, active, objective, backend, chunk_size).run(row_scale, wanted)
    per_row = computed.loss
    return computed._replace(loss=per_row.sum() / denominator if reduction == "mean" else per_row.sum())


class FusedLinearDistillation(torch.autograd.Function):
    """Loss from hidden states and lm_head weights: `(loss, distillation, cross_entropy, sampled_ids,
    w_y, w_hat, entropy)`; the last six have no gradient: the per-row parts (empty unless
    `objective.cross_entropy`), HPD's details (empty for the divergences) and the student's entropy
    per row (empty unless `objective.entropy`). Gradients reach the
    student's hidden states, weight and bias; never the teacher.

    Called as `apply(active, objective, reduction, chunk_size, backend, *inputs)` with `inputs` a
    `LinearInputs` (autograd sees each tensor, so they travel unpacked and are rebuilt by name)."""

    @staticmethod
    def forward(ctx, active, objective: Objective, reduction, chunk_size, backend: Backend, *tensors):
        inputs = LinearInputs(*tensors)
        needs = LinearInputs(*ctx.needs_input_grad[5:])
        wanted = StudentGrads(needs.student_hidden, needs.student_weight,
                              inputs.student_bias is not None and needs.student_bias)
        eager = reduction != "none" and any(wanted)
        if reduction == "none":
            loss, details, parts, grads, entropy = _Chunks(inputs, active, objective, backend, chunk_size).run()
        else:
            loss, details, parts, grads, entropy = scalar_pass(inputs, active, objective, backend, chunk_size,
                                                               reduction, wanted)

        ctx.objective, ctx.backend, ctx.chunk_size = objective, backend, chunk_size
        ctx.wanted, ctx.eager = wanted, eager
        ctx.param_dtypes = (inputs.student_weight.dtype,
                            None if inputs.student_bias is None else inputs.student_bias.dtype)
        if eager:
            ctx.grads = grads
        else:  # "none": backward rebuilds the logits with the per-row incoming gradient
            used_ids = details.sampled_ids if details is not None else inputs.sampled_ids
            ctx.save_for_backward(active, *inputs._replace(sampled_ids=used_ids))
        empty = torch.empty(0, device=inputs.student_hidden.device)
        if details is None:
            details = no_details(empty)
        if parts is None:
            parts = RowParts(empty.clone(), empty.clone())
        if entropy is None:
            entropy = empty.clone()
        ctx.mark_non_differentiable(*parts, *details, entropy)
        return (loss, *parts, *details, entropy)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.eager:  # scaled in place: the one copy of grad_W is its conversion to the weight's dtype below
            grad_hidden, grad_weight, grad_bias = (
                None if grad is None else grad.mul_(grad_loss.to(grad.dtype)) for grad in ctx.grads)
            ctx.grads = None
        else:
            active, *tensors = ctx.saved_tensors
            inputs = LinearInputs(*tensors)
            acc_dtype = accumulation_dtype(inputs.student_hidden.dtype)
            row_scale = torch.where(active, grad_loss.to(acc_dtype), 0.0)
            grad_hidden, grad_weight, grad_bias = _Chunks(inputs, active, ctx.objective, ctx.backend,
                                                          ctx.chunk_size).run(row_scale, ctx.wanted).grads
        weight_dtype, bias_dtype = ctx.param_dtypes
        grads = dict(student_hidden=grad_hidden,
                     student_weight=None if grad_weight is None else grad_weight.to(weight_dtype),
                     student_bias=None if grad_bias is None else grad_bias.to(bias_dtype))
        return (None,) * 5 + tuple(grads.get(name) for name in LinearInputs._fields)
