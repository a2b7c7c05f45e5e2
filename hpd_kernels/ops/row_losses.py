"""Per-row losses of flattened logits, for any objective on any backend, and their autograd Function.

`forward_rows` / `backward_rows` are the one place an `Objective` becomes a backend's entry point
(`divergence_*` or `hybrid_*`); the logits-level Function (`RowLosses`), the fused-linear chunks
and the custom ops all go through them.

The hard-label term `ce_weight * CE(y)` is added here, around the backends, at no extra pass over
the vocabulary. In the unified view it is `ce_weight` more weight on `y` (and on the row sum `W`).
- Forward: `log q(y)` comes from the forward's own log-sum-exps and one gather per row.
- Backward, HPD: its weights already sit on `y`, so `w_y` gains `ce_weight`.
- Backward, divergences: the kernel runs with `W + ce_weight`. Two scatters per row then finish the
  job: `+c` at `y` for the one-hot part, where `c = -(row_scale / T) ce_weight`, and `-c` at the
  row's top column. The kernel wrote that top column as minus the sum of the others, which assumed
  the row summed to 0; with `W + ce_weight` it sums to `-c`, and `-c` puts it back. When `y` is the
  top column the two cancel. That is where `q(y)` is near 1, and there the top column keeps the
  kernel's accurate value.

A row where either side has no distribution (all logits `-inf`: `log_sum = -inf` in the stats; HPD
marks a teacher's so) contributes 0 with its hard-label part, and gets no gradient.
A row whose stats name no top column (`STAT_TOP_S = -1`: every backend where q(top) <= 1/2)
gets only the `+c` at `y`: its top column kept the kernel's `w - q (W + ce_weight)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ..registry import (STAT_LOG_SUM_S, STAT_LOG_SUM_T, STAT_ROW_WEIGHT, STAT_TOP_S, STAT_W_LABEL, STAT_W_SAMPLE,
                        Objective)
from .backend_contract import Backend
from .common import map_slope


class HpdDetails(NamedTuple):
    """HPD's `y_hat`, `w_y` and `w_hat` per row (empty tensors for the divergences where a result
    must hold tensors)."""

    sampled_ids: torch.Tensor
    label_weight: torch.Tensor
    sample_weight: torch.Tensor


class RowParts(NamedTuple):
    """The two parts of a loss with a hard-label term, per row (empty tensors unless asked for)."""

    distillation: torch.Tensor
    cross_entropy: torch.Tensor


class RowForward(NamedTuple):
    """What a forward computed per row: the loss (`distillation + ce_weight * cross_entropy`), its two
    parts (`cross_entropy` None unless `objective.cross_entropy`), the stats, HPD's `y_hat`, and the
    student's entropy (None unless `objective.entropy`)."""

    loss: torch.Tensor
    distillation: torch.Tensor
    cross_entropy: Optional[torch.Tensor]
    stats: torch.Tensor
    sampled_ids: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]


def _defined(stats, objective):
    """Rows where both sides have a distribution (see the module docstring)."""
    defined = stats[:, STAT_LOG_SUM_S] != -math.inf
    if not objective.is_hybrid:
        defined = defined & (stats[:, STAT_LOG_SUM_T] != -math.inf)
    return defined


def _labelled(labels, vocab):
    return (labels >= 0) & (labels < vocab)


def forward_rows(backend: Backend, student, teacher, labels, sampled_ids, objective: Objective,
                 row_ids=None) -> RowForward:
    """The per-row losses in the accumulation dtype. HPD draws `y_hat` when `sampled_ids` is None,
    with the noise of each row's index in the batch, `row_ids` (None: `0..N-1`)."""
    maps = objective.logit_maps
    if objective.is_hybrid:
        computed = backend.hybrid_forward(
            student, teacher, labels, sampled_ids, seed=objective.seed, temperature=objective.temperature,
            fkl_weight=objective.fkl_weight, rkl_weight=objective.rkl_weight, ignore_index=objective.ignore_index,
            row_ids=row_ids, logit_maps=maps, with_entropy=objective.entropy)
        drawn = computed.sampled_ids
    else:
        computed = backend.divergence_forward(
            student, teacher, labels, divergence=objective.name, temperature=objective.temperature,
            log_mix_p=objective.log_mix_p, log_mix_q=objective.log_mix_q, ignore_index=objective.ignore_index,
            logit_maps=maps, with_entropy=objective.entropy)
        drawn = None
    loss, stats, entropy = computed.loss, computed.stats, computed.entropy
    if not objective.cross_entropy or labels is None:
        return RowForward(loss, loss, None, stats, drawn, entropy)
    vocab = min(student.shape[1], teacher.shape[1])
    counted = _labelled(labels, vocab) & (labels != objective.ignore_index) & _defined(stats, objective)
    log_q_y = backend.label_log_probs(student, labels, stats, objective.temperature, logit_maps=maps)
    cross_entropy = torch.where(counted, -log_q_y, 0.0)
    total = loss + objective.ce_weight * cross_entropy if objective.ce_weight else loss
    return RowForward(total, loss, cross_entropy, stats, drawn, entropy)


def _slopes_at(student, rows, columns, objective, dtype):
    """The student map's slope at `columns` of `rows` (1 without a map), read before a backward that
    may overwrite `student` with its gradient."""
    maps = objective.logit_maps
    if maps.student_is_identity:
        return None
    return map_slope(student[rows, columns].to(dtype), maps.student_scale, maps.student_softcap)


def backward_rows(backend: Backend, student, teacher, labels, sampled_ids, stats, row_scale, grad, objective: Objective,
                  vocab: int):
    """Write `dL/ds` of rows scaled by `row_scale` into `grad` (it may be `student` itself). HPD needs
    only the student (its weights sit on `y` and `y_hat`, within the shared `vocab`), the
    divergences the teacher too. With a student map, the two scatters of the hard-label term are in
    the mapped logits' units and take the map's slope at their columns (read before the backend
    overwrites an in-place `grad`)."""
    maps = objective.logit_maps
    hard = objective.ce_weight != 0 and labels is not None
    if hard:  # `ce_weight` more on y and on W, on the rows that have a distribution
        extra = (_defined(stats, objective) & _labelled(labels, vocab)).to(stats.dtype) * objective.ce_weight
        stats = stats.clone()
        stats[:, STAT_W_LABEL if objective.is_hybrid else STAT_ROW_WEIGHT] += extra
    if objective.is_hybrid:
        return backend.hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, vocab=vocab,
                                       temperature=objective.temperature, logit_maps=maps)
    if hard:
        rows = torch.nonzero((row_scale != 0) & (extra != 0))[:, 0]
        c = -row_scale[rows] / objective.temperature * extra[rows]
        with_top = stats[rows, STAT_TOP_S] >= 0
        top_rows = rows[with_top]
        top = stats[top_rows, STAT_TOP_S].long()
        slope_y = _slopes_at(student, rows, labels[rows], objective, c.dtype)
        slope_top = _slopes_at(student, top_rows, top, objective, c.dtype)
    backend.divergence_backward(student, teacher, stats, row_scale, grad, divergence=objective.name,
                                temperature=objective.temperature, log_mix_p=objective.log_mix_p,
                                log_mix_q=objective.log_mix_q, logit_maps=maps)
    if hard:
        # Each entry read and written in the accumulation dtype: one rounding. The top column only
        # where the kernel wrote one from the others (a backend may name none: -1).
        c_y = c if slope_y is None else c * slope_y
        grad[rows, labels[rows]] = (grad[rows, labels[rows]].to(c.dtype) + c_y).to(grad.dtype)
        c_top = c[with_top] if slope_top is None else c[with_top] * slope_top
        grad[top_rows, top] = (grad[top_rows, top].to(c.dtype) - c_top).to(grad.dtype)
    return grad


def row_parts(forward: RowForward, empty) -> RowParts:
    """The per-row parts when they were asked for (`forward.cross_entropy`), else two empty tensors:
    nothing is copied for a call that does not report them. Outputs may not alias the loss, which is
    the distillation part itself when `ce_weight` is 0."""
    if forward.cross_entropy is None:
        return RowParts(empty.clone(), empty.clone())
    distillation = forward.distillation.clone() if forward.distillation is forward.loss else forward.distillation
    return RowParts(distillation, forward.cross_entropy)


def hybrid_details(stats, sampled_ids) -> HpdDetails:
    """HPD's details from a forward's stats, detached copies."""
    return HpdDetails(sampled_ids, stats[:, STAT_W_LABEL].clone(), stats[:, STAT_W_SAMPLE].clone())


def no_details(empty) -> HpdDetails:
    """The divergences' place-holder for HPD's details: empty tensors, none aliasing another."""
    return HpdDetails(empty.long(), empty.clone(), empty.clone())


class RowLosses(torch.autograd.Function):
    """Per-row losses `[N]` of flattened logits, plus (no gradient) the two parts, `distillation` and
    `cross_entropy` (empty unless asked), HPD's `y_hat`, `w_y`, `w_hat` (empty for the
    divergences) and the student's entropy (empty unless asked); the gradient is recomputed in
    backward.

    `backend` is any `Backend`: Triton, torch or a `VocabParallel` slice. `active` marks
    the rows in the loss (the caller's, which knows the vocabulary the labels index). The reduction
    is left to autograd outside (a sum or a mean over `[N]`), whose incoming per-row gradient
    becomes the kernel's `row_scale`.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, active, sampled_ids, objective: Objective, backend: Backend):
        forward = forward_rows(backend, student, teacher, labels, sampled_ids, objective)
        # HPD's backward needs no teacher: do not keep it alive until then.
        ctx.save_for_backward(student, None if objective.is_hybrid else teacher, labels, forward.sampled_ids,
                              forward.stats, active)
        ctx.objective, ctx.backend = objective, backend
        ctx.vocab = min(student.shape[1], teacher.shape[1])
        empty = student.new_empty((0,), dtype=forward.stats.dtype)
        details = hybrid_details(forward.stats, forward.sampled_ids) if objective.is_hybrid else no_details(empty)
        parts = row_parts(forward, empty)
        entropy = empty.clone() if forward.entropy is None else forward.entropy
        ctx.mark_non_differentiable(*parts, *details, entropy)
        return (forward.loss, *parts, *details, entropy)

    @staticmethod
    def backward(ctx, grad_per_row, *_):
        student, teacher, labels, drawn, stats, active = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            row_scale = torch.where(active, grad_per_row.to(stats.dtype), 0.0).contiguous()
            grad = backward_rows(ctx.backend, student, teacher, labels, drawn, stats, row_scale,
                                 torch.empty_like(student, memory_format=torch.contiguous_format), ctx.objective,
                                 ctx.vocab)
        return grad, None, None, None, None, None, None
