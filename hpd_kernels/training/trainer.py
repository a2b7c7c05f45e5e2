"""A minimal distillation trainer: a student learns from a frozen teacher with any objective.

Batches of (prompt, response) token lists are right-padded; only response tokens are in the loss.
The losses start from hidden states and the lm_head weight (fused-linear), so the step never holds
`[tokens, vocab]` logits. AdamW, linear warmup then cosine decay, gradient clipping, gradient
accumulation, bf16 autocast on GPU; one JSON line of metrics per optimiser step, periodic
evaluation, and safetensors checkpoints to resume from.

Every random choice of a step (which examples, whether the batch is on-policy, the rollout and
HPD's sampling noise) is derived from `(seed, step)` alone, so a run resumed from a checkpoint
replays exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import distributed, schema
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .criteria import distillation_loss, shifted_labels, token_statistics
from .jsonfiles import read_metrics, truncate_metrics, writing


@dataclass
class TrainConfig:
    """Options of one training run (`hpd distill --help` lists them with their meaning)."""

    objective: str = "hpd"          # sft, fkl, rkl, jsd, skl, srkl, tvd or hpd
    steps: int = 100                # optimiser steps
    batch_size: int = 16            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimiser step
    lr: float = 3e-3                # peak learning rate
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10          # linear warmup
    weight_decay: float = 0.0       # AdamW
    max_grad_norm: float = 1.0      # gradient clipping (0: off)
    temperature: float = 1.0        # distillation temperature
    fkl_weight: float = 1.0         # HPD: weight of the forward-KL term on the data token
    rkl_weight: float = 1.0         # HPD: weight of the reverse-KL term on the sampled token
    beta: float = 0.5               # JSD mixture weight
    alpha: float = 0.1              # skew KL mixture weight
    ce_weight: float = 0.0          # an extra cross-entropy term on the data tokens
    on_policy_fraction: float = 0.0  # fraction of batches whose responses the student generates
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    max_new_tokens: int = 0         # rollout length (0: the longest response in the data)
    precision: str = "auto"         # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16
    eval_every: int = 0             # steps between evaluations (0: only at the end)
    save_every: int = 0             # steps between checkpoints (0: only at the end)
    strategy: str = "ddp"           # under torchrun: ddp (replicated student) or fsdp (FSDP2 fully_shard)
    seed: int = 0
    backend: str = "auto"           # loss backend: auto, triton or torch

    def __post_init__(self):  # the types and ranges of every field: schema.TRAIN
        schema.TRAIN.check(asdict(self), "TrainConfig", "")

    @classmethod
    def from_dict(cls, values, source="TrainConfig", path=""):
        """A config from a mapping, checked by the schema; an error (`ConfigError`) names `source`,
        the key under `path` and what is expected."""
        schema.TRAIN.check(values, source, path)
        return cls(**values)

    def to_dict(self):
        return asdict(self)


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


def _use_bf16(config, device):
    return config.precision == "bf16" or (config.precision == "auto" and torch.device(device).type == "cuda")


def _forward(model, input_ids, attention, bf16):
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids, attention_mask=attention)


def batch_loss(config: TrainConfig, student, teacher, input_ids, loss_mask, pad_id, seed, num_items_in_batch=None,
               engine=None):
    """`(loss, metrics)` of one micro-batch: the library's loss, exactly.

    With `num_items_in_batch` the loss is this micro-batch's sum over the global batch's active
    token count (see `hybrid_kl_loss`). `engine` is the module that runs the forward pass (a
    DistributedDataParallel wrapper of `student`, say); `student` gives the lm_head."""
    labels = shifted_labels(input_ids, loss_mask)
    attention = (input_ids != pad_id).long() | loss_mask
    bf16 = _use_bf16(config, input_ids.device)
    hidden = _forward(engine if engine is not None else student, input_ids, attention, bf16)
    student_weight = student.lm_head.weight
    if bf16:  # the losses take one dtype per side; fp32 accumulation happens inside them
        hidden, student_weight = hidden.to(torch.bfloat16), student_weight.to(torch.bfloat16)
    metrics = {}
    if config.objective == "sft":
        loss, _ = distillation_loss("sft", hidden, student_weight, None, None, labels,
                                    num_items_in_batch=num_items_in_batch)
    else:
        # The losses fuse the hard-label term, as the cross-entropy at their temperature: at T = 1
        # (the default) that is the data's cross-entropy, at no extra pass; otherwise it is its own pass.
        fused_ce = config.ce_weight if config.temperature == 1.0 else 0.0
        with torch.no_grad():
            teacher_hidden = _forward(teacher, input_ids, attention, bf16)
            teacher_weight = teacher.lm_head.weight
            if bf16:
                teacher_hidden, teacher_weight = teacher_hidden.to(torch.bfloat16), teacher_weight.to(torch.bfloat16)
            metrics["teacher_entropy"] = float(token_statistics(teacher_hidden, teacher_weight, labels)[0])
        loss, details = distillation_loss(
            config.objective, hidden, student_weight, teacher_hidden, teacher_weight, labels,
            seed=seed, temperature=config.temperature, fkl_weight=config.fkl_weight, rkl_weight=config.rkl_weight,
            beta=config.beta, alpha=config.alpha, backend=config.backend, num_items_in_batch=num_items_in_batch,
            ce_weight=fused_ce)
        if details is not None:
            metrics["mismatch_rate"] = float(details.mismatch_rate)
    if config.ce_weight and config.objective != "sft" and config.temperature != 1.0:
        extra, _ = distillation_loss("sft", hidden, student_weight, None, None, labels,
                                     num_items_in_batch=num_items_in_batch)
        loss = loss + config.ce_weight * extra
    # What is reported, whatever the objective: this micro-batch's own means, from one pass.
    entropy, cross_entropy = token_statistics(hidden.detach(), student_weight.detach(), labels)
    metrics["cross_entropy"], metrics["entropy"] = float(cross_entropy), float(entropy)
    return loss, metrics


def _step_rng(config, step, micro, purpose):
    """A seed for one random choice of one micro-batch, a pure function of (seed, step, micro)."""
    return (config.seed * 1_000_003 + step * 7_919 + micro * 104_729 + purpose * 15_485_863) % 2_147_483_647


def _draw_batch(config, student, examples, step, micro, pad_id, eos_id, device, rank=0, world=1):
    """`(input_ids, loss_mask, on_policy)` for this rank's share of one micro-batch: every rank
    draws the same global batch of `batch_size * world` examples and keeps its slice."""
    generator = torch.Generator().manual_seed(_step_rng(config, step, micro, 1))
    picks = torch.randint(0, len(examples), (config.batch_size * world,), generator=generator).tolist()
    picks = picks[rank * config.batch_size:(rank + 1) * config.batch_size]
    batch = [examples[index] for index in picks]
    on_policy = random.Random(_step_rng(config, step, micro, 2)).random() < config.on_policy_fraction
    if on_policy:
        from ..sampling import generate

        max_new = config.max_new_tokens or max(len(response) for _, response in examples)
        rollout = generate(student, [prompt for prompt, _ in batch], max_new_tokens=max_new, eos_id=eos_id,
                           pad_id=pad_id, temperature=config.rollout_temperature, top_p=config.rollout_top_p,
                           generator=torch.Generator(device=device).manual_seed(
                               _step_rng(config, step, micro, 3) + 7_777 * rank))
        responses = rollout.sequences[:, rollout.prompt_width:].tolist()
        batch = [(prompt, response[:length]) for (prompt, _), response, length
                 in zip(batch, responses, rollout.response_lengths.tolist())]
    input_ids, loss_mask = collate(batch, pad_id, device)
    return input_ids, loss_mask, on_policy


def _peak_memory_mb(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


class Progress:
    """A one-line progress bar on a terminal; a line every tenth of the run otherwise."""

    def __init__(self, total, label, stream=None):
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def update(self, step, text):
        elapsed = time.perf_counter() - self.started
        if self.interactive:
            filled = int(30 * step / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} "
                              f"{text} {elapsed:5.0f}s")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step == self.total or step % max(1, self.total // 10) == 0:
            self.stream.write(f"{self.label} {step}/{self.total} {text} {elapsed:.0f}s\n")
            self.stream.flush()


def _wrap(config, student, world, device):
    """The module that runs the forward pass: the student itself, or its DDP / FSDP2 wrapper."""
    if world == 1:
        return student, None
    if config.strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        from .fsdp import shard_student

        # A student sharded by an earlier run (a warm-up, say) is sharded already.
        return (student if isinstance(student, FSDPModule) else shard_student(student)), "fsdp"
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids), "ddp"


def train(config: TrainConfig, student, teacher, examples, *, pad_id=0, eos_id=None, evaluate=None,
          run_dir=None, label=None, progress=True, stop_after=None, log=print):
    """Train `student` in place on `examples` (a list of (prompt ids, response ids)).

    `evaluate(model, step) -> dict` runs every `eval_every` steps and after the last; its values enter
    the step's metrics as `eval_<name>`. With `run_dir`, metrics go to `run_dir/metrics.jsonl`,
    checkpoints to `run_dir/checkpoint-*`, and a run that finds a checkpoint there resumes from it
    (refusing one written with a different config or other examples, or whose files do not match
    their recorded checksums). `stop_after` ends this call after that many steps, as an
    interruption would: the next call resumes from the last checkpoint (or from the start, without
    one) and replays the steps after it; `metrics.jsonl` is cut back to the checkpoint's step, so
    it always ends up exactly that of an uninterrupted run.

    Under torchrun (an initialised default process group), `batch_size` is per rank, the student is
    wrapped in DDP (or sharded with FSDP2: `strategy="fsdp"`), and the loss is the mean over the
    active tokens of the global batch. Rank 0 logs, evaluates and checkpoints.
    Returns the list of per-step metric dicts.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    if config.objective != "sft" and teacher is None:
        raise ValueError(f"objective {config.objective!r} needs a teacher")
    device = student.lm_head.weight.device
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    torch.manual_seed(config.seed)
    engine, strategy = _wrap(config, student, world, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history, start_step = [], 0
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if run_dir:
        data_sha256 = examples_sha256(examples)
        checkpoint, state = latest_checkpoint(run_dir, sharded=strategy == "fsdp")
        if checkpoint is not None:
            if state.get("config") != config.to_dict():
                changed = sorted(key for key in config.to_dict() if state.get("config", {}).get(key) != getattr(config, key))
                raise CheckpointError(f"{run_dir} holds a run with a different config (differs in {changed}); "
                                      f"use another output directory: nothing there was changed")
            if state.get("examples_sha256", data_sha256) != data_sha256:
                raise CheckpointError(f"{run_dir} holds a run trained on other examples (their sha256 differs: the "
                                      f"data changed); use another output directory: nothing there was changed")
            if strategy == "fsdp":
                from .fsdp import load_sharded

                load_sharded(checkpoint, student, optimizer)
            else:
                load_checkpoint(checkpoint, student, optimizer)
            start_step = state["step"]
            # Every rank checks (each reads the same file), so that none waits for a refused rank 0.
            _check_metrics_reach(metrics_path, start_step)
            if log and main:
                log(f"resumed {run_dir} at step {start_step}/{config.steps}")
        # The metrics are exactly those of the steps up to the checkpoint: the steps after it (or
        # every step, without a checkpoint) are replayed and must not appear twice.
        distributed.barrier()
        if main:
            with writing(run_dir):
                os.makedirs(run_dir, exist_ok=True)
            truncate_metrics(metrics_path, start_step)
        distributed.barrier()
        if checkpoint is not None:
            history = read_metrics(metrics_path)
    if teacher is not None:
        teacher.eval()
    student.train()
    bar = Progress(config.steps, label or config.objective) if progress and main else None
    metrics_file = None
    if metrics_path and main:
        with writing(metrics_path):
            metrics_file = open(metrics_path, "a")
    try:
        end_step = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
        for step in range(start_step, end_step):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            batches = [_draw_batch(config, student, examples, step, micro, pad_id, eos_id, device, rank, world)
                       for micro in range(config.grad_accum)]
            # Active tokens: position i predicts token i + 1, so the mask without its first column.
            tokens = int(distributed.all_reduce_sum([sum(int(mask[:, 1:].sum()) for _, mask, _ in batches)],
                                                    device)[0])
            # One division by the active tokens of the global batch (all ranks, all micro-batches).
            # A single micro-batch on a single process keeps the plain mean (the same numbers).
            global_tokens = max(1, tokens) if world > 1 or config.grad_accum > 1 else None
            totals, on_policy_batches = {"loss": 0.0}, 0
            for micro, (input_ids, loss_mask, on_policy) in enumerate(batches):
                on_policy_batches += on_policy
                seed = _step_rng(config, step, micro, 4) + 7_777 * rank
                sync = strategy != "ddp" or micro == config.grad_accum - 1
                with (contextlib.nullcontext() if sync else engine.no_sync()):
                    loss, metrics = batch_loss(config, student, teacher, input_ids, loss_mask, pad_id, seed,
                                               num_items_in_batch=global_tokens, engine=engine)
                    # DDP and FSDP average gradients over ranks; the loss is already a share of the
                    # global mean, so undo that average.
                    (loss * world).backward()
                totals["loss"] += float(loss.detach())
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / config.grad_accum
            if global_tokens is not None:
                keys = sorted(totals)
                reduced = distributed.all_reduce_sum([totals[key] for key in keys], device)
                totals = {key: value if key == "loss" else value / world for key, value in zip(keys, reduced)}
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            elapsed = time.perf_counter() - started
            record = {"step": step + 1, **totals, "grad_norm": float(grad_norm), "lr": learning_rate(config, step),
                      "on_policy_fraction": on_policy_batches / config.grad_accum, "tokens": tokens,
                      "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                      "peak_memory_mb": _peak_memory_mb(device)}
            last = step + 1 == config.steps
            if evaluate is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                if main or strategy == "fsdp":  # a sharded model needs every rank in its forward passes
                    scores = evaluate(student, step + 1)
                    if main:
                        record.update({f"eval_{key}": value for key, value in scores.items()})
                student.train()
                distributed.barrier()
            history.append(record)
            if metrics_file:
                with writing(metrics_path):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if run_dir and (last or (config.save_every and (step + 1) % config.save_every == 0)):
                if metrics_file:  # on disk before the checkpoint they must cover (see _check_metrics_reach)
                    with writing(metrics_path):
                        os.fsync(metrics_file.fileno())
                trainer_state = {"config": config.to_dict(), "examples_sha256": data_sha256}
                if strategy == "fsdp":
                    from .fsdp import save_sharded

                    save_sharded(run_dir, step + 1, student, optimizer, trainer_state)
                elif main:
                    save_checkpoint(run_dir, step + 1, student, optimizer, trainer_state)
                distributed.barrier()
            if bar:
                bar.update(step + 1, f"loss {record['loss']:.4f} ce {record['cross_entropy']:.4f} "
                                     f"{record['tokens_per_s']:.0f} tok/s")
    finally:
        if metrics_file:
            try:
                metrics_file.close()
            except OSError:
                pass  # a failed flush of a full disk: the error already on its way says so
    return history


def _check_metrics_reach(path, step):
    """Refuse to resume from a checkpoint at `step` when the metrics at `path` lack some step up to
    it: resuming continues after `step`, so the missing steps would be missing from the run's record
    for good. A record is written (and, before a checkpoint, synced) before the checkpoint that
    covers it, so only a file cut short or edited lacks one; a half-written last line comes after
    the checkpoint's step and is dropped by `read_metrics` as before."""
    if not os.path.isfile(path):
        found = f"does not exist, but the checkpoint at step {step} needs the metrics of its {step} steps"
        missing = step
    else:
        present = {record.get("step") for record in read_metrics(path) if isinstance(record, dict)}
        missing = sum(number not in present for number in range(1, step + 1))
        if not missing:
            return
        last = max((number for number in present if isinstance(number, int) and number <= step), default=0)
        found = (f"holds the metrics of {step - missing} of the {step} steps up to the checkpoint at step {step} "
                 f"({f'they end at step {last}' if last < step else 'some in between are gone'}: the file was cut "
                 f"short or edited)")
    raise CheckpointError(f"{path} {found}; resuming would leave {missing} steps out of the run's metrics: restore "
                          f"the file, or start over in another output directory (nothing there was changed)")


def examples_sha256(examples):
    """The sha256 of the training examples (token ids): a checkpoint records it, and a run whose
    examples changed under it is not continued."""
    digest = hashlib.sha256()
    for prompt, response in examples:
        digest.update(json.dumps([list(prompt), list(response)]).encode())
    return digest.hexdigest()
