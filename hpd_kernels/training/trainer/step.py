"""One optimiser step: the learning-rate schedule, the micro-batches' losses and gradients summed
over every rank, clipping, and the step's metrics record."""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass

import torch

from .. import distributed
from .batches import draw_batch, step_seed
from .loss import batch_loss


@dataclass
class RunSetup:
    """What every step of one run uses: the models, the optimiser, the data, and this process's
    place among the ranks. `engine` runs the student's forward pass (the student itself, or its
    DDP / FSDP2 wrapper: `strategy`)."""

    config: object
    student: object
    teacher: object
    engine: object
    strategy: object
    optimizer: object
    examples: list
    pad_id: int
    eos_id: object
    device: torch.device
    rank: int
    world: int


def learning_rate(config, step: int) -> float:
    """The learning rate of optimiser step `step` (from 0): the warmup, then `config.schedule`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def optimiser_step(run: RunSetup, step):
    """Take optimiser step `step` (from 0) and return its metrics record."""
    config, device = run.config, run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    run.optimizer.zero_grad(set_to_none=True)
    batches = [draw_batch(config, run.student, run.examples, step, micro, run.pad_id, run.eos_id, device, run.rank,
                          run.world)
               for micro in range(config.grad_accum)]
    # Active tokens: position i predicts token i + 1, so the mask without its first column.
    tokens = int(distributed.all_reduce_sum([sum(int(mask[:, 1:].sum()) for _, mask, _ in batches)], device)[0])
    # One division by the active tokens of the global batch (all ranks, all micro-batches).
    # A single micro-batch on a single process keeps the plain mean (the same numbers).
    global_tokens = max(1, tokens) if run.world > 1 or config.grad_accum > 1 else None
    totals, on_policy_batches = _accumulate_gradients(run, step, batches, global_tokens)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.student.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    elapsed = time.perf_counter() - started
    return {"step": step + 1, **totals, "grad_norm": float(grad_norm), "lr": learning_rate(config, step),
            "on_policy_fraction": on_policy_batches / config.grad_accum, "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "peak_memory_mb": peak_memory_mb(device)}


def _accumulate_gradients(run: RunSetup, step, batches, global_tokens):
    """Backward through every micro-batch; `(totals, on_policy_batches)`: the summed loss and the
    mean of the other metrics, over every rank when the loss is a share of the global batch."""
    config = run.config
    totals, on_policy_batches = {"loss": 0.0}, 0
    for micro, (input_ids, loss_mask, on_policy) in enumerate(batches):
        on_policy_batches += on_policy
        seed = step_seed(config, step, micro, 4) + 7_777 * run.rank
        label_seed = step_seed(config, step, micro, 5) + 7_777 * run.rank  # the teacher's draw of sft's targets
        sync = run.strategy != "ddp" or micro == config.grad_accum - 1
        with (contextlib.nullcontext() if sync else run.engine.no_sync()):
            loss, metrics = batch_loss(config, run.student, run.teacher, input_ids, loss_mask, run.pad_id, seed,
                                       num_items_in_batch=global_tokens, engine=run.engine, label_seed=label_seed)
            # DDP and FSDP average gradients over ranks; the loss is already a share of the
            # global mean, so undo that average.
            (loss * run.world).backward()
        totals["loss"] += float(loss.detach())
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / config.grad_accum
    if global_tokens is not None:
        keys = sorted(totals)
        reduced = distributed.all_reduce_sum([totals[key] for key in keys], run.device)
        totals = {key: value if key == "loss" else value / run.world for key, value in zip(keys, reduced)}
    return totals, on_policy_batches
