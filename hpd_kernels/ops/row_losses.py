"""Per-row losses of flattened logits, for any objective on any backend, and their autograd Function.

`forward_rows` / `backward_rows` are the one place an `Objective` becomes a backend's entry point
(`divergence_*` or `hybrid_*`); the logits-level Function (`RowLosses`), the fused-linear chunks
and the custom ops all go through them.
"""

from __future__ import annotations

import torch

from ..registry import STAT_W_LABEL, STAT_W_SAMPLE, Objective


def forward_rows(backend, student, teacher, labels, sampled_ids, objective: Objective, row_offset=0):
    """`(loss [N], stats [N, objective.stats_columns], y_hat [N] or None)` in the accumulation dtype.
    HPD draws `y_hat` when `sampled_ids` is None, with the noise of rows `row_offset + i`."""
    if objective.is_hybrid:
        return backend.hybrid_forward(
            student, teacher, labels, sampled_ids, seed=objective.seed, temperature=objective.temperature,
            fkl_weight=objective.fkl_weight, rkl_weight=objective.rkl_weight, ignore_index=objective.ignore_index,
            row_offset=row_offset)
    loss, stats = backend.divergence_forward(
        student, teacher, labels, divergence=objective.name, temperature=objective.temperature,
        log_mix_p=objective.log_mix_p, log_mix_q=objective.log_mix_q, ignore_index=objective.ignore_index)
    return loss, stats, None


def backward_rows(backend, student, teacher, labels, sampled_ids, stats, row_scale, grad, objective: Objective,
                  vocab: int):
    """Write `dL/ds` of rows scaled by `row_scale` into `grad` (it may be `student` itself). HPD needs
    only the student (its weights sit on `y` and `y_hat`, within the shared `vocab`), the
    divergences the teacher too."""
    if objective.is_hybrid:
        return backend.hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, vocab=vocab,
                                       temperature=objective.temperature)
    return backend.divergence_backward(student, teacher, stats, row_scale, grad, divergence=objective.name,
                                       temperature=objective.temperature, log_mix_p=objective.log_mix_p,
                                       log_mix_q=objective.log_mix_q)


def hybrid_details(stats, sampled_ids):
    """HPD's `(y_hat, w_y, w_hat)` from a forward's stats, detached copies."""
    return sampled_ids, stats[:, STAT_W_LABEL].clone(), stats[:, STAT_W_SAMPLE].clone()


class RowLosses(torch.autograd.Function):
    """Per-row losses `[N]` of flattened logits, plus HPD's `y_hat`, `w_y`, `w_hat` (no gradient;
    empty for the divergences); the gradient is recomputed in backward.

    `backend` is the Triton backend, the torch backend or a `VocabParallel` slice. `active` marks
    the rows in the loss (the caller's, which knows the vocabulary the labels index). The reduction
    is left to autograd outside (a sum or a mean over `[N]`), whose incoming per-row gradient
    becomes the kernel's `row_scale`.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, active, sampled_ids, objective, backend):
        loss, stats, drawn = forward_rows(backend, student, teacher, labels, sampled_ids, objective)
        # HPD's backward needs no teacher: do not keep it alive until then.
        ctx.save_for_backward(student, None if objective.is_hybrid else teacher, labels, drawn, stats, active)
        ctx.objective, ctx.backend = objective, backend
        ctx.vocab = min(student.shape[1], teacher.shape[1])
        if objective.is_hybrid:
            details = hybrid_details(stats, drawn)
        else:
            empty = student.new_empty((0,), dtype=stats.dtype)
            details = (empty.long(), empty, empty.clone())
        ctx.mark_non_differentiable(*details)
        return (loss, *details)

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
