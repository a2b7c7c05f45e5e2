"""Checkpoints in safetensors (never pickle): model weights, AdamW state and the trainer's position.

A run directory holds `checkpoint-<step>/` folders and `latest.json`, which names the newest
complete one. A checkpoint is written to a temporary folder and renamed into place, and
`latest.json` is replaced atomically, so an interrupted save never damages the previous one.
Loading checks that every tensor name and shape matches the model before anything is copied:
a checkpoint from another model is refused with the first mismatch named.

`latest.json` also records the sha256 of every file of the checkpoint, computed when it is
published; resuming verifies them first, so a flipped byte or a truncated file is refused with
the file named instead of resuming into another model (or NaN weights). A write the system
refuses (a full disk) is a one-line `WriteError` naming the file, and the previous checkpoint
stays in place.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..digests import file_sha256
from .jsonfiles import write_json_atomic, writing

try:
    from safetensors.torch import load_file, save_file
except ImportError:  # pragma: no cover - safetensors is a dependency; the message says why it matters
    load_file = save_file = None


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this model or run."""


def _require_safetensors():
    if save_file is None:
        raise ImportError("checkpoints need the `safetensors` package: pip install safetensors")


def unique_state(model):
    """The model's tensors under one name each (tied weights are stored once)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        state[name] = tensor
    return state


def save_model(model, path, metadata=None):
    """Weights of `model` to `path` (safetensors), with string `metadata`, written atomically."""
    _require_safetensors()
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in unique_state(model).items()}
    temporary = f"{path}.tmp"
    with writing(path):
        try:
            save_file(state, temporary, metadata={key: str(value) for key, value in (metadata or {}).items()})
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def load_model(model, path):
    """Load weights saved by `save_model` into `model`, after checking every name and shape."""
    _require_safetensors()
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        state = load_file(path)
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {error}") from error
    expected = unique_state(model)
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} was saved from another model: "
            + (f"it lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"it has tensors this model does not: {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
               if unexpected else ""))
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path} was saved from another model: tensor {name!r} has shape "
                                  f"{list(state[name].shape)} there and {list(tensor.shape)} in this model")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def _optimizer_tensors(optimizer):
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    return tensors, json.dumps(state["param_groups"])


def save_checkpoint(run_dir, step, model, optimizer, trainer_state):
    """Write `checkpoint-<step>/` under `run_dir`, point `latest.json` at it, drop older ones."""
    _require_safetensors()
    os.makedirs(run_dir, exist_ok=True)
    name = f"checkpoint-{step:07d}"
    temporary = os.path.join(run_dir, f".{name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    with writing(temporary):
        try:
            os.makedirs(temporary)
            save_model(model, os.path.join(temporary, "model.safetensors"))
            tensors, groups = _optimizer_tensors(optimizer)
            with writing(os.path.join(temporary, "optimizer.safetensors")):
                save_file(tensors, os.path.join(temporary, "optimizer.safetensors"), metadata={"param_groups": groups})
            with writing(os.path.join(temporary, "trainer_state.json")):
                with open(os.path.join(temporary, "trainer_state.json"), "w") as handle:
                    json.dump({"step": step, **trainer_state}, handle, indent=1)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)  # give back the space; the previous checkpoint stays
            raise
    return publish_checkpoint(run_dir, name, step)


def _checksums(folder):
    """`{relative path: sha256}` of every file under `folder`."""
    sums = {}
    for root, _, names in os.walk(folder):
        for file in names:
            path = os.path.join(root, file)
            sums[os.path.relpath(path, folder)] = file_sha256(path)
    return dict(sorted(sums.items()))


def verify_checksums(folder, checksums):
    """Refuse a checkpoint whose files differ from the checksums recorded when it was published."""
    for relative, expected in checksums.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; nothing was loaded")
        if file_sha256(path) != expected:
            raise CheckpointError(f"{path} does not match the sha256 checksum recorded when it was written "
                                  f"(the file is damaged or was changed); nothing was loaded")


def record_sha256(path):
    """Write the sha256 of the file at `path` beside it (`<path>.sha256`), for `verify_sha256`."""
    write_json_atomic(f"{path}.sha256", {"sha256": file_sha256(path)}, indent=None)


def verify_sha256(path):
    """Refuse the file at `path` if it differs from the sha256 `record_sha256` wrote (a file with
    no record, from before records were written, is accepted)."""
    record = f"{path}.sha256"
    if os.path.isfile(record):
        with open(record) as handle:
            expected = json.load(handle).get("sha256")
        if expected and file_sha256(path) != expected:
            raise CheckpointError(f"{path} does not match the sha256 checksum recorded when it was written "
                                  f"(the file is damaged or was changed); nothing was loaded")


def publish_checkpoint(run_dir, name, step):
    """Move the complete `.<name>.tmp` folder into place, point `latest.json` at it (atomically,
    with the sha256 of each of its files) and drop the older checkpoints."""
    final, temporary = os.path.join(run_dir, name), os.path.join(run_dir, f".{name}.tmp")
    checksums = _checksums(temporary)
    with writing(final):
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
    write_json_atomic(os.path.join(run_dir, "latest.json"), {"checkpoint": name, "step": step, "sha256": checksums},
                      indent=None)
    for entry in os.listdir(run_dir):
        if entry.startswith("checkpoint-") and entry != name:
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
    return final


def latest_checkpoint(run_dir, sharded=False):
    """`(path, trainer_state)` of the newest complete checkpoint in `run_dir`, or `(None, None)`.
    Its files are verified against the checksums recorded when it was published; a checkpoint of
    the other kind (sharded FSDP against a single file) is refused."""
    pointer = os.path.join(run_dir, "latest.json")
    if not os.path.isfile(pointer):
        return None, None
    try:
        with open(pointer) as handle:
            latest = json.load(handle)
        name = latest["checkpoint"]
        path = os.path.join(run_dir, name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{pointer} cannot be read: {error}") from error
    # Checkpoints written before checksums were recorded have none to verify.
    verify_checksums(path, latest.get("sha256") or {})
    try:
        with open(os.path.join(path, "trainer_state.json")) as handle:
            state = json.load(handle)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{pointer} names a checkpoint that cannot be read: {error}") from error
    if bool(state.get("sharded", False)) != sharded:
        kind = "a sharded (FSDP) checkpoint" if state.get("sharded") else "a single-file checkpoint"
        raise CheckpointError(f"{path} is {kind}; this run needs the other kind (strategy and world size must "
                              f"match the run that wrote it)")
    return path, state


def load_checkpoint(path, model, optimizer):
    """Restore `model` and `optimizer` from a folder written by `save_checkpoint`."""
    load_model(model, os.path.join(path, "model.safetensors"))
    load_optimizer(path, optimizer)


def load_optimizer(path, optimizer, state_only=False):
    """Restore `optimizer` from the optimizer file of a folder written by `save_checkpoint`, after
    checking that its state fits the optimizer's parameters (their count per group, and each
    tensor's shape). With `state_only`, the per-parameter state (AdamW's moments and step counts)
    is loaded and the param groups keep their own hyperparameters (another run's state, continued
    under this run's options)."""
    optimizer_file = os.path.join(path, "optimizer.safetensors")
    from safetensors import safe_open

    try:
        tensors = load_file(optimizer_file)
        with safe_open(optimizer_file, framework="pt") as handle:
            groups = json.loads(handle.metadata()["param_groups"])
    except Exception as error:  # a missing, truncated or foreign file: safetensors' own exception types
        raise CheckpointError(f"{optimizer_file} is not a readable optimizer checkpoint: {error}") from error
    state = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    if len(groups) != len(optimizer.param_groups) or any(
            len(saved["params"]) != len(current["params"]) for saved, current in zip(groups, optimizer.param_groups)):
        raise CheckpointError(f"{optimizer_file} holds optimizer state for different parameters")
    # The optimizer's state_dict numbers its parameters in group order, as `state`'s indices.
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for index, values in sorted(state.items()):
        if index >= len(parameters):
            raise CheckpointError(f"{optimizer_file} holds optimizer state for different parameters: it has state for "
                                  f"parameter {index}, this model has {len(parameters)}")
        for name, tensor in values.items():
            # Scalars (AdamW's step count) fit any parameter; a moment has the parameter's shape.
            if tensor.dim() and tuple(tensor.shape) != tuple(parameters[index].shape):
                raise CheckpointError(f"{optimizer_file} holds optimizer state for different parameters: {name!r} of "
                                      f"parameter {index} has shape {list(tensor.shape)} there and "
                                      f"{list(parameters[index].shape)} in this model")
    if state_only:
        groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
