"""A run directory's checkpoints as the run loop uses them: resume from the latest one (refusing a
different run's), and save one at a scheduled step. The run's metrics are kept exactly those of the
steps up to its checkpoint."""

from __future__ import annotations

import hashlib
import json
import os

from .. import distributed
from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_optimizer, save_checkpoint
from ..jsonfiles import read_metrics, truncate_metrics, writing


def examples_sha256(examples):
    """The sha256 of the training examples (token ids): a checkpoint records it, and a run whose
    examples changed under it is not continued."""
    digest = hashlib.sha256()
    for prompt, response in examples:
        digest.update(json.dumps([list(prompt), list(response)]).encode())
    return digest.hexdigest()


def resume(run, run_dir, metrics_path, data_sha256, log, initial_optimizer=None):
    """`(start_step, history)`: the latest checkpoint in `run_dir` loaded into the student and the
    optimiser, and the metrics of the steps up to it (from the start, without one: then the
    optimiser's state comes from `initial_optimizer`, if given; see `load_initial_optimizer`)."""
    config, main = run.config, run.rank == 0
    start_step, history = 0, []
    checkpoint, state = latest_checkpoint(run_dir, sharded=run.strategy == "fsdp")
    if checkpoint is None and initial_optimizer is not None:  # before the directory is made: a refusal changes nothing
        load_initial_optimizer(run, initial_optimizer, log)
    if checkpoint is not None:
        _check_same_run(state, config, run_dir, data_sha256)
        if run.strategy == "fsdp":
            from .fsdp import load_sharded

            load_sharded(checkpoint, run.student, run.optimizer)
        else:
            load_checkpoint(checkpoint, run.student, run.optimizer)
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
    return start_step, history


def load_initial_optimizer(run, path, log):
    """Load the optimiser state (moments, step counts; not the hyperparameters, nor any weights) of
    another run's checkpoint: `path` is a checkpoint folder (`<run_dir>/checkpoint-0001200`) or a
    run directory (its latest checkpoint). Its files are verified against their recorded checksums
    when they were recorded (by its run directory's `latest.json`)."""
    folder, parent = path, os.path.dirname(os.path.normpath(path))
    if os.path.isfile(os.path.join(path, "latest.json")):
        folder, _ = latest_checkpoint(path)
    elif os.path.isfile(os.path.join(parent, "latest.json")):
        latest_checkpoint(parent)  # verifies its latest checkpoint: this one (a save drops the older ones)
    if not os.path.isfile(os.path.join(folder, "optimizer.safetensors")):
        raise CheckpointError(f"initial optimizer {path} is neither a checkpoint folder (with optimizer.safetensors) "
                              f"nor a run directory (with latest.json)")
    load_optimizer(folder, run.optimizer, state_only=True)
    if log and run.rank == 0:
        log(f"optimizer state from {folder}")


def _check_same_run(state, config, run_dir, data_sha256):
    """Refuse a checkpoint written with a different config or other examples. An option the saved
    config lacks (a run from before the option existed) was at its default."""
    saved = {**type(config)().to_dict(), **state.get("config", {})}
    if saved != config.to_dict():
        changed = sorted(key for key in config.to_dict() if saved.get(key) != getattr(config, key))
        raise CheckpointError(f"{run_dir} holds a run with a different config (differs in {changed}); "
                              f"use another output directory: nothing there was changed")
    if state.get("examples_sha256", data_sha256) != data_sha256:
        raise CheckpointError(f"{run_dir} holds a run trained on other examples (their sha256 differs: the "
                              f"data changed); use another output directory: nothing there was changed")


def save(run, run_dir, steps_done, data_sha256, metrics_file, metrics_path):
    """Checkpoint the run after `steps_done` steps (every rank takes part; one writes unless sharded)."""
    if metrics_file:  # on disk before the checkpoint they must cover (see _check_metrics_reach)
        with writing(metrics_path):
            os.fsync(metrics_file.fileno())
    trainer_state = {"config": run.config.to_dict(), "examples_sha256": data_sha256}
    if run.strategy == "fsdp":
        from .fsdp import save_sharded

        save_sharded(run_dir, steps_done, run.student, run.optimizer, trainer_state)
    elif run.rank == 0:
        save_checkpoint(run_dir, steps_done, run.student, run.optimizer, trainer_state)
    distributed.barrier()


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
