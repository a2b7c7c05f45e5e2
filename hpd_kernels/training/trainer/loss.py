"""The loss of one micro-batch: the student's and teacher's forward passes, the objective's
fused-linear loss, and the metrics every objective reports alike."""

from __future__ import annotations

import torch

from ...models import logit_map, loss_maps
from ..criteria import distillation_loss, shifted_labels, token_statistics


def use_bf16(config, device):
    return config.precision == "bf16" or (config.precision == "auto" and torch.device(device).type == "cuda")


def _forward(model, input_ids, attention, bf16):
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids, attention_mask=attention)


def batch_loss(config, student, teacher, input_ids, loss_mask, pad_id, seed, num_items_in_batch=None,
               engine=None):
    """`(loss, metrics)` of one micro-batch: the library's loss, exactly.

    With `num_items_in_batch` the loss is this micro-batch's sum over the global batch's active
    token count (see `hybrid_kl_loss`). `engine` is the module that runs the forward pass (a
    DistributedDataParallel wrapper of `student`, say); `student` gives the lm_head."""
    labels = shifted_labels(input_ids, loss_mask)
    attention = (input_ids != pad_id).long() | loss_mask
    bf16 = use_bf16(config, input_ids.device)
    hidden = _forward(engine if engine is not None else student, input_ids, attention, bf16)
    student_weight = student.lm_head.weight
    if bf16:  # the losses take one dtype per side; fp32 accumulation happens inside them
        hidden, student_weight = hidden.to(torch.bfloat16), student_weight.to(torch.bfloat16)
    metrics = {}
    maps = loss_maps(student, teacher)   # the models' logit scales and soft caps (identity for most)
    if config.objective == "sft":
        loss = distillation_loss("sft", hidden, student_weight, None, None, labels,
                                 num_items_in_batch=num_items_in_batch, logit_maps=maps).loss
    else:
        # The losses fuse the hard-label term, as the cross-entropy at their temperature: at T = 1
        # (the default) that is the data's cross-entropy, and the loss reports it and the student's
        # entropy from its own passes; otherwise the term and the metrics take a pass of their own.
        at_one = config.temperature == 1.0
        with torch.no_grad():
            teacher_hidden = _forward(teacher, input_ids, attention, bf16)
            teacher_weight = teacher.lm_head.weight
            if bf16:
                teacher_hidden, teacher_weight = teacher_hidden.to(torch.bfloat16), teacher_weight.to(torch.bfloat16)
            metrics["teacher_entropy"] = float(token_statistics(teacher_hidden, teacher_weight, labels,
                                                                logit_map=logit_map(teacher))[0])
        computed = distillation_loss(
            config.objective, hidden, student_weight, teacher_hidden, teacher_weight, labels,
            seed=seed, temperature=config.temperature, fkl_weight=config.fkl_weight, rkl_weight=config.rkl_weight,
            beta=config.beta, alpha=config.alpha, backend=config.backend, num_items_in_batch=num_items_in_batch,
            ce_weight=config.ce_weight if at_one else 0.0, report=at_one, logit_maps=maps)
        loss = computed.loss
        if computed.details is not None:
            metrics["mismatch_rate"] = float(computed.details.mismatch_rate)
        if at_one:
            active = (labels != -100).sum().clamp(min=1)
            # The part is reduced as the loss: over `num_items_in_batch` when given, else this batch's mean.
            total = computed.cross_entropy * (num_items_in_batch if num_items_in_batch is not None else active)
            metrics["cross_entropy"] = float(total / active)
            metrics["entropy"] = float(computed.entropy.sum() / active)
            return loss, metrics
    if config.ce_weight and config.objective != "sft" and config.temperature != 1.0:
        extra = distillation_loss("sft", hidden, student_weight, None, None, labels,
                                  num_items_in_batch=num_items_in_batch, logit_maps=maps).loss
        loss = loss + config.ce_weight * extra
    # SFT, or a temperature other than 1: this micro-batch's own means, from one more pass.
    entropy, cross_entropy = token_statistics(hidden.detach(), student_weight.detach(), labels,
                                              logit_map=logit_map(student))
    metrics["cross_entropy"], metrics["entropy"] = float(cross_entropy), float(entropy)
    return loss, metrics
