"""FSDP2 for the trainer: the student sharded with `fully_shard`, checkpoints sharded with
`torch.distributed.checkpoint` in safetensors files (its Hugging Face storage writer: no pickle).

Each transformer block is its own FSDP unit and the root holds the embedding, the final norm and
the lm_head; the root stays unsharded between its forward and backward, which is when the
fused-linear loss reads the lm_head weight.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from ..checkpoint import CheckpointError, publish_checkpoint
from ..jsonfiles import writing

MODEL, OPTIMIZER = "model.", "optimizer."


def shard_student(student):
    for block in getattr(student, "blocks", []):
        fully_shard(block)
    fully_shard(student)
    return student


def _flatten(model, optimizer):
    """One flat {name: tensor} of the model and optimizer state (sharded DTensors stay sharded),
    and the optimizer's param_groups (plain numbers, kept as JSON)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {MODEL + name: tensor for name, tensor in model_state.items()}
    for fqn, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"{OPTIMIZER}{fqn}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, optimizer_state["param_groups"]


def save_sharded(run_dir, step, model, optimizer, trainer_state):
    """Every rank writes its shards into `checkpoint-<step>/`; rank 0 then points `latest.json` at it."""
    name = f"checkpoint-{step:07d}"
    temporary = os.path.join(run_dir, f".{name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    dist.barrier()
    tensors, groups = _flatten(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(temporary, save_distributed=True))
    dist.barrier()
    if dist.get_rank() == 0:
        with writing(os.path.join(temporary, "trainer_state.json")), \
                open(os.path.join(temporary, "trainer_state.json"), "w") as handle:
            json.dump({"step": step, "sharded": True, "world_size": dist.get_world_size(), "param_groups": groups,
                       **trainer_state}, handle, indent=1)
        publish_checkpoint(run_dir, name, step)
    dist.barrier()


def load_sharded(path, model, optimizer):
    """Restore a sharded checkpoint into the (already sharded) model and its optimizer."""
    with open(os.path.join(path, "trainer_state.json")) as handle:
        state = json.load(handle)
    tensors, _ = _flatten(model, optimizer)  # the layout to fill (initialises the optimizer state)
    try:
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(path))
    except Exception as error:  # DCP reports missing or mis-shaped entries in its own exception types
        raise CheckpointError(f"{path} does not fit this model and optimizer: {error}") from error
    model_state = {name[len(MODEL):]: tensor for name, tensor in tensors.items() if name.startswith(MODEL)}
    optimizer_state = {"state": {}, "param_groups": state["param_groups"]}
    for name, tensor in tensors.items():
        if name.startswith(OPTIMIZER):
            fqn, key = name[len(OPTIMIZER):].split("::")
            optimizer_state["state"].setdefault(fqn, {})[key] = tensor
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
