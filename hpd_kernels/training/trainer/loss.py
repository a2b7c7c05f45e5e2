"""The loss of one micro-batch: the student's and teacher's forward passes, the objective's
fused-linear loss, and the metrics every objective reports alike."""

from __future__ import annotations

import torch

from ...models import logit_map, loss_maps
from ...ops.common import map_logits
from ..criteria import distillation_loss, shifted_labels, token_statistics

# Rows of one chunk of the teacher's draw: one chunk's `[rows, vocab]` float32 exists at a time.
DRAW_CHUNK_ROWS = 8192


def use_bf16(config, device):
    return config.precision == "bf16" or (config.precision == "auto" and torch.device(device).type == "cuda")


def _forward(model, input_ids, attention, bf16):
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids, attention_mask=attention)


@torch.no_grad()
def _teacher_side(teacher, input_ids, attention, bf16):
    """`(hidden, lm_head weight)` of the frozen teacher, in the dtype the losses take."""
    hidden, weight = _forward(teacher, input_ids, attention, bf16), teacher.lm_head.weight
    if bf16:
        hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    return hidden, weight


@torch.no_grad()
def teacher_sampled_labels(teacher_hidden, teacher_weight, labels, temperature, generator, teacher_map,
                           chunk_rows=DRAW_CHUNK_ROWS):
    """`labels` with every active position's token replaced by one drawn from the teacher's
    next-token distribution there (its logits mapped by `teacher_map`, then divided by
    `temperature`), with `generator`; ignored positions stay ignored."""
    active = labels.reshape(-1) != -100
    rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[active]
    draws = []
    for start in range(0, rows.shape[0], chunk_rows):
        logits = map_logits((rows[start:start + chunk_rows] @ teacher_weight.t()).float(), teacher_map[0],
                            teacher_map[1] or 0.0)
        # In place, so that the chunk's weights are its logits' buffer: multinomial takes them unnormalised.
        weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).div_(temperature).exp_()
        draws.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    drawn = labels.clone().reshape(-1)
    if draws:
        drawn[active] = torch.cat(draws)
    return drawn.reshape(labels.shape)


def batch_loss(config, student, teacher, input_ids, loss_mask, pad_id, seed, num_items_in_batch=None,
               engine=None, label_seed=None):
    """`(loss, metrics)` of one micro-batch: the library's loss, exactly.

    With `num_items_in_batch` the loss is this micro-batch's sum over the global batch's active
    token count (see `hybrid_kl_loss`). `engine` is the module that runs the forward pass (a
    DistributedDataParallel wrapper of `student`, say); `student` gives the lm_head. `label_seed`
    seeds the teacher's draw of sft's targets (`labels="teacher_sample"`)."""
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
        targets = labels
        if config.labels == "teacher_sample":
            if teacher is None:
                raise ValueError("labels 'teacher_sample' needs a teacher")
            if label_seed is None:
                raise ValueError("labels 'teacher_sample' needs label_seed (the seed of the teacher's draw)")
            teacher_hidden, teacher_weight = _teacher_side(teacher, input_ids, attention, bf16)
            metrics["teacher_entropy"] = _entropy(teacher_hidden, teacher_weight, labels, teacher)
            generator = torch.Generator(device=input_ids.device).manual_seed(label_seed)
            # Over the shared vocabulary (the first columns of both), as the distillation losses' teacher.
            shared = teacher_weight[:student_weight.shape[0]]
            targets = teacher_sampled_labels(teacher_hidden, shared, labels, config.temperature, generator,
                                             logit_map(teacher))
        # The draw's cross-entropy: one token of the teacher per position, a one-sample estimate of
        # the forward KL's gradient (the data's cross-entropy is still the one reported, below).
        loss = distillation_loss("sft", hidden, student_weight, None, None, targets,
                                 num_items_in_batch=num_items_in_batch, logit_maps=maps).loss
    else:
        # The losses fuse the hard-label term, as the cross-entropy at their temperature: at T = 1
        # (the default) that is the data's cross-entropy, and the loss reports it and the student's
        # entropy from its own passes; otherwise the term and the metrics take a pass of their own.
        at_one = config.temperature == 1.0
        teacher_hidden, teacher_weight = _teacher_side(teacher, input_ids, attention, bf16)
        metrics["teacher_entropy"] = _entropy(teacher_hidden, teacher_weight, labels, teacher)
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


def _entropy(teacher_hidden, teacher_weight, labels, teacher):
    """The teacher's mean entropy over the active positions (a metric)."""
    return float(token_statistics(teacher_hidden, teacher_weight, labels, logit_map=logit_map(teacher))[0])
