"""Pieces every Triton kernel family shares: availability, launch shapes, online log-sum-exp."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton runs kernels as NumPy on the CPU (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device: torch.device) -> bool:
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


# Widest vocabulary tile. Tests lower it to push small vocabularies through many tiles.
MAX_BLOCK_V = 4096
# float64 accumulation (the exactness path) doubles the registers per element: 4096-wide tiles
# spill in the mixture divergences (ptxas -v), 1024 do not.
GPU_FP64_BLOCK_V = 1024


def launch_shape(n_rows: int, vocab: int, device: torch.device, fp64: bool = False) -> dict:
    """Rows per program, vocabulary tile and warps.

    On a GPU one program streams one row in 4096-column tiles: rows are independent and a
    100k-vocabulary row is 25+ tiles, enough to keep the loads in flight. Under the interpreter
    every `tl` op costs a NumPy call whatever its size, so one program takes a tile of up to 32k
    elements: 16 rows of a wide vocabulary, up to 256 of a narrow one.
    """
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))
    if device.type == "cpu":
        block_n = min(triton.next_power_of_2(max(n_rows, 1)), max(16, min(256, 32768 // block_v)))
        return {"BLOCK_N": block_n, "BLOCK_V": block_v, "num_warps": 4}
    if fp64:
        block_v = min(block_v, GPU_FP64_BLOCK_V)
    return {"BLOCK_N": 1, "BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


if HAS_TRITON:

    @triton.jit
    def online_logsumexp_step(running_max, running_sum, logits):
        """One tile of an online log-sum-exp over axis 1.

        Returns the new running max and sum, `exp(logits - reference)` for the tile and the factor
        that rescales any other running sum kept against the same reference. A row that has seen
        only `-inf` so far keeps a reference of 0, so no `-inf - -inf` NaN appears; `+inf` or NaN
        logits still give NaN, as the spec requires.
        """
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        reference = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - reference)
        exps = tl.exp(logits - reference[:, None])
        return new_max, running_sum * rescale + tl.sum(exps, axis=1), exps, rescale

    @triton.jit
    def logaddexp(a, b):
        """log(exp a + exp b), finite-safe when both are -inf (gives -inf, not NaN)."""
        larger = tl.maximum(a, b)
        reference = tl.where(larger == float("-inf"), 0.0, larger)
        return reference + tl.log(tl.exp(a - reference) + tl.exp(b - reference))

else:  # pragma: no cover
    online_logsumexp_step = logaddexp = None
