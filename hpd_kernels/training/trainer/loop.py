"""The run loop: `train` takes the steps of one run, evaluating, logging and checkpointing on
schedule, and resumes a run directory where its last checkpoint left it."""

from __future__ import annotations

import json
import os

import torch

from .. import distributed
from ..jsonfiles import writing
from .checkpointing import examples_sha256, load_initial_optimizer, resume, save
from .options import TrainConfig
from .progress import Progress
from .step import RunSetup, optimiser_step


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


def _start(config: TrainConfig, student, teacher, examples, pad_id, eos_id, initial_optimizer):
    """The run's `RunSetup`: the student wrapped for this process's ranks, and a fresh AdamW."""
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    if config.objective != "sft" and teacher is None:
        raise ValueError(f"objective {config.objective!r} needs a teacher")
    if config.labels == "teacher_sample" and teacher is None:
        raise ValueError("labels 'teacher_sample' needs a teacher (its tokens are drawn from the teacher)")
    if initial_optimizer is not None and config.strategy == "fsdp" and distributed.world_size() > 1:
        raise ValueError("initial_optimizer is not supported with strategy 'fsdp' (the optimizer state is sharded): "
                         "continue the run with strategy 'ddp', or without initial_optimizer")
    device = student.lm_head.weight.device
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(config.seed)
    engine, strategy = _wrap(config, student, world, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return RunSetup(config, student, teacher, engine, strategy, optimizer, examples, pad_id, eos_id, device, rank,
                    world)


def _due(every, step, last):
    """Whether a thing done every `every` steps (0: only at the end) is due after `step` steps."""
    return last or bool(every and step % every == 0)


def _evaluate_into(record, run: RunSetup, evaluate, steps_done):
    """Add `evaluate`'s scores to the step's record (as `eval_<name>`), on rank 0."""
    main = run.rank == 0
    if main or run.strategy == "fsdp":  # a sharded model needs every rank in its forward passes
        scores = evaluate(run.student, steps_done)
        if main:
            record.update({f"eval_{key}": value for key, value in scores.items()})
    run.student.train()
    distributed.barrier()


def train(config: TrainConfig, student, teacher, examples, *, pad_id=0, eos_id=None, evaluate=None,
          run_dir=None, label=None, progress=True, stop_after=None, log=print, initial_optimizer=None):
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

    `initial_optimizer` continues another run's optimiser: a checkpoint folder written by
    `save_checkpoint` (`<run_dir>/checkpoint-0001200`), or a run directory (its latest checkpoint).
    A run that starts from step 0 loads that checkpoint's AdamW state (moments, step counts) into
    its fresh AdamW, so that training on from its weights (which the caller has already put in
    `student`: they are not loaded) has no restart dip; a run resuming its own checkpoint keeps
    its own state. Not with FSDP2.
    Returns the list of per-step metric dicts.
    """
    run = _start(config, student, teacher, examples, pad_id, eos_id, initial_optimizer)
    main = run.rank == 0
    history, start_step, data_sha256 = [], 0, None
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if run_dir:
        data_sha256 = examples_sha256(examples)
        start_step, history = resume(run, run_dir, metrics_path, data_sha256, log, initial_optimizer)
    elif initial_optimizer is not None:
        load_initial_optimizer(run, initial_optimizer, log)
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
            record = optimiser_step(run, step)
            last = step + 1 == config.steps
            if evaluate is not None and _due(config.eval_every, step + 1, last):
                _evaluate_into(record, run, evaluate, step + 1)
            history.append(record)
            if metrics_file:
                with writing(metrics_path):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            if run_dir and _due(config.save_every, step + 1, last):
                save(run, run_dir, step + 1, data_sha256, metrics_file, metrics_path)
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
