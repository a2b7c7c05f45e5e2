"""A minimal distillation trainer: a student learns from a frozen teacher with any objective.

Batches of (prompt, response) token lists are right-padded; only response tokens are in the loss.
The losses start from hidden states and the lm_head weight (fused-linear), so the step never holds
`[tokens, vocab]` logits. AdamW, linear warmup then cosine decay, gradient clipping, gradient
accumulation; one JSON line of metrics per optimiser step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from .objectives import OBJECTIVES, distillation_loss, shifted_labels


@dataclass
class TrainConfig:
    objective: str = "hpd"
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    fkl_weight: float = 1.0
    rkl_weight: float = 1.0
    ce_weight: float = 0.0
    seed: int = 0
    backend: str = "auto"
    metrics_path: str | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def collate(examples, pad_id, device):
    """`(input_ids, loss_mask)`: prompt + response per row, right-padded; the mask covers responses."""
    width = max(len(prompt) + len(response) for prompt, response in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        tokens = list(prompt) + list(response)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        loss_mask[row, len(prompt): len(tokens)] = 1
    return input_ids.to(device), loss_mask.to(device)


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_loss(config: TrainConfig, student, teacher, input_ids, loss_mask, pad_id, seed):
    """The training loss of one micro-batch and what it reports (the library's loss, exactly)."""
    labels = shifted_labels(input_ids, loss_mask)
    attention = (input_ids != pad_id).long() | loss_mask
    hidden = student(input_ids, attention_mask=attention)
    metrics = {}
    if config.objective == "sft":
        loss, _ = distillation_loss("sft", hidden, student.lm_head.weight, None, None, labels)
    else:
        with torch.no_grad():
            teacher_hidden = teacher(input_ids, attention_mask=attention)
        loss, details = distillation_loss(
            config.objective, hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels,
            seed=seed, temperature=config.temperature, fkl_weight=config.fkl_weight, rkl_weight=config.rkl_weight,
            backend=config.backend)
        if details is not None:
            metrics["mismatch_rate"] = float(details.mismatch_rate)
    if config.objective == "sft":
        cross_entropy = loss.detach()
    elif config.ce_weight:
        cross_entropy, _ = distillation_loss("sft", hidden, student.lm_head.weight, None, None, labels)
        loss = loss + config.ce_weight * cross_entropy
    else:  # reported only: no graph
        with torch.no_grad():
            cross_entropy, _ = distillation_loss("sft", hidden.detach(), student.lm_head.weight, None, None, labels)
    metrics["cross_entropy"] = float(cross_entropy.detach())
    return loss, metrics, int((labels != -100).sum())


def train(config: TrainConfig, student, teacher, examples, *, pad_id=0, log=print):
    """Train `student` in place on `examples` (list of (prompt, response) id lists); returns the
    list of per-step metric dicts."""
    torch.manual_seed(config.seed)
    device = student.lm_head.weight.device
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    metrics_file = open(config.metrics_path, "a") if config.metrics_path else None
    try:
        for step in range(config.steps):
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            totals, tokens = {"loss": 0.0}, 0
            for micro in range(config.grad_accum):
                picks = torch.randint(0, len(examples), (config.batch_size,), generator=generator).tolist()
                input_ids, loss_mask = collate([examples[i] for i in picks], pad_id, device)
                seed = config.seed * 1_000_003 + step * config.grad_accum + micro
                loss, metrics, micro_tokens = batch_loss(config, student, teacher, input_ids, loss_mask, pad_id, seed)
                (loss / config.grad_accum).backward()
                totals["loss"] += float(loss.detach()) / config.grad_accum
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / config.grad_accum
                tokens += micro_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            elapsed = time.perf_counter() - start
            record = {"step": step + 1, **totals, "grad_norm": float(grad_norm), "lr": learning_rate(config, step),
                      "tokens_per_s": tokens / elapsed}
            history.append(record)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
            if log and (step + 1) % max(1, config.steps // 10) == 0:
                log(f"step {step + 1}/{config.steps} loss {record['loss']:.4f} ce {record['cross_entropy']:.4f}")
    finally:
        if metrics_file:
            metrics_file.close()
    return history
