"""The trainer under `torchrun`: process-group setup, data sharding and the global token count.

Under `torchrun` (WORLD_SIZE > 1 in the environment) the trainer initialises the default process
group itself (NCCL on CUDA, gloo on the CPU), places each rank on its own GPU, wraps the student in
DistributedDataParallel, gives each rank its slice of every global batch, and reduces the loss over
the active tokens of the *global* batch (every rank, every accumulation step): a per-rank or
per-micro-batch mean would weight the tokens of short sequences more than those of long ones.
Rank 0 alone logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def initialised():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if initialised() else 1


def rank():
    return dist.get_rank() if initialised() else 0


def is_main():
    return rank() == 0


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_from_env():
    """Initialise the default group when launched by torchrun; returns the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not initialised():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (a no-op on one process)."""
    if not initialised() or world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier():
    if initialised() and world_size() > 1:
        dist.barrier()


def broadcast_object(value):
    if not initialised() or world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown():
    """Leave the process group together (a rank that tears gloo down while a peer still talks to it
    can abort the peer)."""
    if initialised():
        barrier()
        dist.destroy_process_group()
