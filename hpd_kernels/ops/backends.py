"""The backend of a call, chosen once: the Triton kernels or their torch twin, each an implementation
of `ops.backend_contract.Backend` (so is `ops.vocab_parallel.VocabParallel`, which the entry layer
uses instead on a vocabulary slice). The custom ops of `torch.compile` must carry a string in their
schema, so they hold `backend.NAME` and turn it back into the backend with `by_name`.
"""

from __future__ import annotations

import torch

from .backend_contract import Backend
from .torch_backend import TORCH
from .triton.backend import TRITON
from .triton.utils import HAS_TRITON, interpreter_enabled, triton_usable_on

CHOICES = ("auto", "triton", "torch")


def by_name(name: str) -> Backend:
    return TRITON if name == TRITON.NAME else TORCH


def choose(choice: str, device: torch.device) -> Backend:
    """'auto' takes Triton on CUDA and torch elsewhere; 'triton' where it cannot run is an error."""
    if choice == "torch":
        return TORCH
    if choice == "auto":
        return TRITON if device.type == "cuda" and HAS_TRITON else TORCH
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; use backend='torch'")
    if not triton_usable_on(device):
        hint = ("set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU "
                "through Triton's interpreter" if device.type == "cpu" and not interpreter_enabled() else
                "Triton kernels run on CUDA devices")
        raise RuntimeError(f"backend='triton' cannot run on {device}: {hint}; or use backend='torch'")
    return TRITON
