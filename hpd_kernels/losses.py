"""The logits-level losses: each checks its arguments, resolves one `LossCall` and runs it.

All the arithmetic lives in `ops/` (the Triton kernels and their torch twin); the shared entry steps
(argument checks in `checks`, the resolved call and its reductions in `calls`) are the same ones the
fused-linear losses use.
"""

from __future__ import annotations

import torch

from .calls import HybridDetails, LossParts, resolve
from .checks import (check_ce_weight, check_divergence, check_flag, check_fraction, check_hpd_options, check_labels,
                     check_logit_maps, check_logit_pair, check_num_items, check_options, check_reduction)
from .registry import DIVERGENCES, HPD

__all__ = ["HybridDetails", "LossParts", "DIVERGENCE_LOSSES", "forward_kl_loss", "reverse_kl_loss", "generalized_jsd_loss",
           "skew_forward_kl_loss", "skew_reverse_kl_loss", "tvd_loss", "hybrid_kl_loss", "hpd_token_weights"]


def _resolve(objective_name, student_logits, teacher_logits, labels, *, labels_required, temperature, ignore_index,
             reduction, backend, process_group, vocab_offset, **options):
    check_logit_pair(student_logits, teacher_logits, sliced=process_group is not None)
    leading = student_logits.shape[:-1]
    check_options(temperature, reduction, backend, ignore_index)
    check_labels(labels, leading, student_logits.device, ignore_index, required=labels_required)
    return resolve(objective_name, labels=labels, leading=leading, n_rows=leading.numel(),
                   device=student_logits.device, widths=(student_logits.shape[-1], teacher_logits.shape[-1]),
                   names=("student_logits", "teacher_logits"), temperature=temperature, ignore_index=ignore_index,
                   reduction=reduction, backend=backend, process_group=process_group, vocab_offset=vocab_offset,
                   **options)


def _rows(logits):
    """Flatten `[..., V]` to `[N, V]` keeping a row stride when possible; the last dim must be unit-stride."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


# ----------------------------------------------------------------------------------------------
# Full-vocabulary divergences.
# ----------------------------------------------------------------------------------------------

def divergence_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", beta=0.5, alpha=0.1,
                    temperature=1.0, ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                    process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                    student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                    return_entropy=False):
    """Any full-vocabulary divergence by name (`registry.DIVERGENCES`); the named functions below
    are this with `divergence=` fixed.

    `ce_weight` adds the hard-label term `ce_weight * CE(y)` (the cross-entropy of
    `softmax(s / T)` at the labels) at no extra pass over the vocabulary; `return_parts=True`
    returns `(loss, LossParts(distillation, cross_entropy))`, each reduced as the loss is.

    `student_logit_scale`, `student_softcap` (and the teacher's): each model's logit
    post-processing, `softcap * tanh(scale * z / softcap)` (Gemma's `final_logit_softcapping`
    after a `logit_scale`), or `scale * z` without a cap, applied to the given logits before the
    temperature inside the kernels' own passes, with the gradient through the `tanh`; a `-inf`
    logit stays `-inf`. `return_entropy=True` appends the student's entropy per row (nats, of the
    `q` the loss uses, 0 outside the loss, no gradient), computed in the forward's own pass."""
    check_divergence(divergence)
    check_fraction("beta", beta)
    check_fraction("alpha", alpha)
    check_num_items(num_items_in_batch, reduction)
    check_ce_weight(ce_weight)
    call = _resolve(divergence, student_logits, teacher_logits, labels, labels_required=False,
                    temperature=temperature, ignore_index=ignore_index, reduction=reduction, backend=backend,
                    num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
                    beta=beta, alpha=alpha, ce_weight=ce_weight, return_parts=return_parts,
                    logit_maps=check_logit_maps(student_logit_scale, teacher_logit_scale, student_softcap,
                                                teacher_softcap),
                    return_entropy=check_flag("return_entropy", return_entropy))
    return call.outputs(*call.rows(_rows(student_logits), _rows(teacher_logits)))


def forward_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
                    reduction="mean", backend="auto", num_items_in_batch=None,
                    process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                    student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                    return_entropy=False):
    """KL(p || q), the mode-covering divergence. Gradient weights `w = p`."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="forward_kl", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, ce_weight=ce_weight, return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def reverse_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
                    reduction="mean", backend="auto", num_items_in_batch=None,
                    process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                    student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                    return_entropy=False):
    """KL(q || p), the mode-seeking divergence. Weights `w = q (log p - log q)`."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, ce_weight=ce_weight, return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                         student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                         return_entropy=False):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta=0 is forward KL, 1 reverse KL."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="jsd", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, beta=beta, ce_weight=ce_weight, return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def skew_forward_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                         student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                         return_entropy=False):
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL)."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_forward_kl", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, alpha=alpha, ce_weight=ce_weight,
                           return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def skew_reverse_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                         student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                         return_entropy=False):
    """KL(q || alpha q + (1 - alpha) p) (DistiLLM's skew reverse KL)."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_reverse_kl", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, alpha=alpha, ce_weight=ce_weight,
                           return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def tvd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="mean", backend="auto", num_items_in_batch=None,
             process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
             student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
             return_entropy=False):
    """Total variation distance 1/2 sum |p - q|."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="tvd", temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           num_items_in_batch=num_items_in_batch, process_group=process_group,
                           vocab_offset=vocab_offset, ce_weight=ce_weight, return_parts=return_parts,
                           student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


# ----------------------------------------------------------------------------------------------
# Hybrid Policy Distillation.
# ----------------------------------------------------------------------------------------------

def hybrid_kl_loss(student_logits, teacher_logits, labels, *, sampled_ids=None, seed=None, fkl_weight=1.0,
                   rkl_weight=1.0, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
                   return_details=False, num_items_in_batch=None, process_group=None, vocab_offset=None,
                   ce_weight=0.0, return_parts=False,
                   student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                   return_entropy=False):
    """Hybrid Policy Distillation loss (spec: forward-KL signal on `y`, reverse-KL signal on `y_hat ~ q`).

    `sampled_ids` gives `y_hat` (shape of `labels`); when None the kernel draws it by Gumbel-max,
    reproducibly from `seed` (or from torch's generator when `seed` is None as well).
    With `return_details=True` returns `(loss, HybridDetails)`.

    `num_items_in_batch` (with `reduction="mean"`) divides the summed loss by the active tokens of
    the global batch instead of this call's. `process_group` makes the call vocabulary-parallel:
    the logits are this rank's slice of the vocabulary, starting at `vocab_offset` (default: the
    widths of the lower ranks), and labels / `sampled_ids` are global ids.

    `ce_weight`, `return_parts`: the hard-label term, as in `divergence_loss`. With both
    `return_details` and `return_parts`, returns `(loss, HybridDetails, LossParts)`.
    """
    check_reduction(reduction)
    check_num_items(num_items_in_batch, reduction)
    check_hpd_options(fkl_weight, rkl_weight, seed)
    check_ce_weight(ce_weight)
    call = _resolve(HPD, student_logits, teacher_logits, labels, labels_required=True, temperature=temperature,
                    ignore_index=ignore_index, reduction=reduction, backend=backend,
                    num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
                    sampled_ids=sampled_ids, seed=seed, fkl_weight=fkl_weight, rkl_weight=rkl_weight,
                    ce_weight=ce_weight, return_parts=return_parts,
                    logit_maps=check_logit_maps(student_logit_scale, teacher_logit_scale, student_softcap,
                                                teacher_softcap),
                    return_entropy=check_flag("return_entropy", return_entropy))
    return call.outputs(*call.rows(_rows(student_logits), _rows(teacher_logits)), return_details=return_details)


@torch.no_grad()
def hpd_token_weights(student_logits, teacher_logits, labels, *, sampled_ids=None, seed=None, fkl_weight=1.0,
                      rkl_weight=1.0, temperature=1.0, ignore_index=-100, backend="auto", process_group=None,
                      vocab_offset=None) -> HybridDetails:
    """HPD's per-row weights `(w_y, w_hat)` and samples `y_hat`, forward only (no graph is built)."""
    _, details = hybrid_kl_loss(student_logits.detach(), teacher_logits, labels, sampled_ids=sampled_ids, seed=seed,
                                fkl_weight=fkl_weight, rkl_weight=rkl_weight, temperature=temperature,
                                ignore_index=ignore_index, reduction="none", backend=backend, return_details=True,
                                process_group=process_group, vocab_offset=vocab_offset)
    return details


# The divergences by their registry names (`registry.DIVERGENCES`): each function under its own name, in the
# registry's order (checked, never assumed).
DIVERGENCE_LOSSES = {"forward_kl": forward_kl_loss, "reverse_kl": reverse_kl_loss, "jsd": generalized_jsd_loss,
                     "skew_forward_kl": skew_forward_kl_loss, "skew_reverse_kl": skew_reverse_kl_loss,
                     "tvd": tvd_loss}
if tuple(DIVERGENCE_LOSSES) != DIVERGENCES:
    raise ImportError(f"DIVERGENCE_LOSSES names {tuple(DIVERGENCE_LOSSES)}, registry.DIVERGENCES {DIVERGENCES}")
