"""HPD's `y_hat` in the torch backend: the Triton kernel's block draw (`ops/gumbel.py`), rounded as it
rounds it (always eager; on the CPU its `exp2`/`log2` are NumPy's, as the interpreter's are), so
that both backends draw the same tokens from one seed."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..gumbel import DRAW_BLOCK, block_seed_key, gumbel2_at_torch, gumbel2_torch, row_keys_torch


def gumbel_scores(student, scale, row_keys, columns):
    """Per-column Gumbel-max scores in base 2, `s log2(e) / T + g2` (float32), rounded as the kernel
    rounds its scores (the draw inside a block; `bench/sass.py`'s replay)."""
    return gumbel2_torch(row_keys, columns).add_((student.to(scale.dtype) * scale).float())


def block_log2_masses(blocks, scale):
    """`[rows, B, P]` logits (accumulation dtype, `-inf` padded) -> each block's base-2 log-mass
    `r c + log2 sum 2^((s - r) c)` `[rows, B]`, `r` the block's max (0 where infinite), `c = scale`."""
    if blocks.device.type == "cpu":  # NumPy's exp2/log2: the interpreter's
        x = blocks.detach().numpy()
        c = x.dtype.type(scale.item())
        # The max is exact in any order: torch's, which reduces 16 contiguous values per block many
        # times faster than NumPy's per-block reduction (most of the CPU draw's time before).
        top = blocks.detach().amax(dim=2).numpy()
        ref = np.where(np.isinf(top), x.dtype.type(0), top)
        # The sum over the last (contiguous) axis of 16: NumPy's own order, as in the interpreter.
        sums = np.exp2((x - ref[:, :, None]) * c).sum(axis=2)
        with np.errstate(divide="ignore"):  # log2(0) = -inf: a block of -inf logits
            return torch.from_numpy(ref * c + np.log2(sums))
    top = blocks.amax(dim=2)
    ref = torch.where(top.isinf(), torch.zeros_like(top), top)
    sums = torch.exp2((blocks - ref[:, :, None]) * scale)
    while sums.shape[-1] > 1:  # a fixed tree of adjacent pairs: the same bits whatever the shape (slices)
        sums = sums[..., 0::2] + sums[..., 1::2]
    return ref * scale + torch.log2(sums[..., 0])


def padded_blocks(logits, lead=0):
    """`[rows, W]` -> `[rows, B, P]`: `lead` `-inf` columns first (a slice starting inside a block),
    `-inf` after to a whole number of blocks."""
    width = lead + logits.shape[1]
    tail = -width % DRAW_BLOCK
    padded = torch.nn.functional.pad(logits, (lead, tail), value=-math.inf)
    return padded.view(logits.shape[0], -1, DRAW_BLOCK)


def block_scores(blocks, scale, key, row_ids, ids):
    """The blocks' Gumbel-max scores `m_b + g2_block` (float32) `[rows, B]`; `ids`: their global
    block indices `[B]`."""
    keys = row_keys_torch(block_seed_key(key), row_ids)
    return _nan_first(gumbel2_torch(keys, ids).add_(block_log2_masses(blocks, scale).float()))


def _nan_first(scores):
    """NaN scores (from NaN logits) as `+inf`: they rank first, as in the kernel (a row with a NaN
    logit has a NaN loss whatever it draws; this keeps the draw defined and the backends alike)."""
    return torch.where(scores.isnan(), torch.full_like(scores, math.inf), scores)


def in_block_scores(logits, block, scale, key, row_ids, offset=0, vocab_end=None):
    """The column scores inside each row's drawn `block` `[rows]`: `(columns [rows, P], owned, scores)`,
    `-inf` at columns outside these logits (`offset`: the global column of their first) or past
    `vocab_end`."""
    width = logits.shape[1]
    vocab_end = offset + width if vocab_end is None else vocab_end
    columns = block[:, None] * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=logits.device)
    local = columns - offset
    owned = (local >= 0) & (local < width) & (columns < vocab_end)
    values = logits.gather(1, local.clamp(0, max(0, width - 1)))
    values = torch.where(owned, values, torch.full_like(values, -math.inf))
    scores = gumbel2_at_torch(row_keys_torch(key, row_ids), columns).add_((values * scale).float())
    return columns, owned, torch.where(owned, _nan_first(scores), torch.full_like(scores, -math.inf))


def sample_gumbel_max(student, row_ids, key, scale):
    """y_hat for the rows of unscaled logits whose indices in the batch are `row_ids` (the noise's
    keys); `scale` is log2(e) / T as a tensor of the accumulation dtype (the kernel's). Under a
    student logit map the caller passes the mapped chunk (`hybrid._sampled_logits`, in the
    accumulation dtype), so the draw is from the mapped student."""
    logits = student.to(scale.dtype)
    blocks = padded_blocks(logits)
    ids = torch.arange(blocks.shape[1], device=logits.device)
    block = block_scores(blocks, scale, key, row_ids, ids).argmax(dim=-1)
    columns, _, scores = in_block_scores(logits, block, scale, key, row_ids)
    return columns.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]
