"""The trainer's objectives, each a call into the library's fused-linear losses.

A batch is `input_ids [B, S]` with `loss_mask [B, S]` (1 on response tokens, 0 on prompt and
padding). Position `i` predicts token `i + 1`, so hidden states are shifted here, once, and the
losses see aligned rows (the spec's convention). The student's logits never exist in full: the
losses take its final hidden states and lm_head weight.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint

import hpd_kernels
from ..models import IDENTITY_MAP
from ..ops.common import map_logits
from ..registry import HPD, SFT, SHORT_NAMES, TRAINING_OBJECTIVES, accumulation_dtype


def shifted_labels(input_ids, loss_mask, ignore_index=-100):
    """Labels aligned with hidden states: row `i` predicts token `i + 1`; masked tokens ignored."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], ignore_index))
    return labels


def _chunk_cross_entropy(hidden, weight, labels, ignore_index, logit_map):
    logits = hidden @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = map_logits(logits, logit_map[0], logit_map[1] or 0.0)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def cross_entropy_from_hidden(hidden, weight, labels, ignore_index=-100, chunk_rows=1024, num_items_in_batch=None,
                              logit_map=IDENTITY_MAP):
    """Cross-entropy on the data (SFT), mean over active tokens (or the sum over
    `num_items_in_batch`), from hidden states (logits mapped by the model's `logit_map`). Each
    chunk's logits are recomputed in backward (activation checkpointing), so they never all exist at
    once."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1)
    total = rows.new_zeros((), dtype=accumulation_dtype(rows.dtype))
    for start in range(0, rows.shape[0], chunk_rows):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_cross_entropy, rows[start:start + chunk_rows], weight, flat[start:start + chunk_rows], ignore_index,
            logit_map, use_reentrant=False)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (flat != ignore_index).sum().clamp(min=1)


class ObjectiveLoss(NamedTuple):
    """One objective's loss and what it reports from its own passes: HPD's `HybridDetails` (sampled
    ids, `y_hat != y` rate; None for the other objectives) and, with `report=True` (a distillation
    objective), the student's entropy per row and the data's cross-entropy (`LossParts`' part,
    reduced as the loss is), both at the loss's temperature."""

    loss: torch.Tensor
    details: Optional[object] = None
    entropy: Optional[torch.Tensor] = None
    cross_entropy: Optional[torch.Tensor] = None


def distillation_loss(objective, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                      seed=None, temperature=1.0, fkl_weight=1.0, rkl_weight=1.0, beta=0.5, alpha=0.1,
                      backend="auto", num_items_in_batch=None, ce_weight=0.0, report=False,
                      logit_maps=None) -> ObjectiveLoss:
    """One objective's `ObjectiveLoss`. `num_items_in_batch`: divide the sum by the global batch's
    active tokens instead of the mean. `ce_weight`: the losses' fused hard-label term (the
    cross-entropy at `temperature`). `report`: also the entropy and cross-entropy, at no extra pass
    (not for SFT, whose loss is the cross-entropy). `logit_maps`: the models' (`models.loss_maps`)."""
    maps = logit_maps or {}
    if objective == SFT:
        student_map = (maps.get("student_logit_scale", 1.0), maps.get("student_softcap"))
        return ObjectiveLoss(cross_entropy_from_hidden(student_hidden, student_weight, labels,
                                                       num_items_in_batch=num_items_in_batch, logit_map=student_map))
    reported = dict(return_entropy=True, return_parts=True, **maps) if report else dict(maps)
    if SHORT_NAMES.get(objective) == HPD:
        loss, details, *rest = hpd_kernels.fused_linear_hybrid_kl_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, seed=seed, temperature=temperature,
            fkl_weight=fkl_weight, rkl_weight=rkl_weight, backend=backend, return_details=True,
            num_items_in_batch=num_items_in_batch, ce_weight=ce_weight, **reported)
    elif objective in SHORT_NAMES:
        loss, details = hpd_kernels.fused_linear_divergence_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence=SHORT_NAMES[objective],
            beta=beta, alpha=alpha, temperature=temperature, backend=backend, num_items_in_batch=num_items_in_batch,
            ce_weight=ce_weight, **reported), None
        loss, *rest = loss if report else (loss,)
    else:
        raise ValueError(f"objective must be one of {TRAINING_OBJECTIVES}, got {objective!r}")
    if not report:
        return ObjectiveLoss(loss, details)
    parts, entropy = rest
    return ObjectiveLoss(loss, details, entropy, parts.cross_entropy)


@torch.no_grad()
def token_statistics(hidden, weight, labels, ignore_index=-100, chunk_rows=1024, logit_map=IDENTITY_MAP):
    """`(entropy, cross_entropy)`: the mean entropy of `softmax(hidden @ weight.T)` (mapped by the
    model's `logit_map`) and the mean cross-entropy of the labels, in nats per active position, from
    one float32 pass over chunks of rows (metrics: no graph, no full `[tokens, vocab]` tensor)."""
    active = labels.reshape(-1) != ignore_index
    rows, targets = hidden.reshape(-1, hidden.shape[-1])[active], labels.reshape(-1)[active]
    entropy = torch.zeros((), dtype=torch.float64, device=hidden.device)
    cross_entropy = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = map_logits((rows[start:start + chunk_rows] @ weight.t()).float(), logit_map[0], logit_map[1] or 0.0)
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy -= (log_probs.exp() * log_probs).nan_to_num().sum().double()
        cross_entropy -= log_probs.gather(1, targets[start:start + chunk_rows, None]).sum().double()
    count = max(1, rows.shape[0])
    return entropy / count, cross_entropy / count
