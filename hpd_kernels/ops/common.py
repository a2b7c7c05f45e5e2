"""Helpers shared by the Triton and the torch backends (the stats columns are in `registry`)."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634

def temperature_scalars(temperature, acc_dtype):
    """`[scale, scale_low, 1 / T]`: `log2(e) / T` as two numbers of the accumulation dtype (rounded
    down, the rest), whose sum is exact to ~2^-48 (`log2_softmax`), and `1 / T` itself for what the
    kernels compute in natural units (exact at the usual powers of two, where `LN2 * scale` would
    round). The rest is kept strictly positive, so that a `-inf` logit times it is `-inf`, not NaN."""
    scale = LOG2E / temperature
    rounded = torch.tensor(scale, dtype=acc_dtype)
    if rounded.item() >= scale:
        rounded = torch.nextafter(rounded, torch.zeros_like(rounded))
    return [rounded.item(), scale - rounded.item(), 1.0 / temperature]


def map_logits(logits, scale: float, softcap: float):
    """`registry.LogitMaps`' map of one side, in the dtype given: `softcap * tanh(scale * z / softcap)`,
    or `scale * z` where `softcap` is 0; `-inf` stays `-inf`."""
    if softcap == 0.0:
        return logits if scale == 1.0 else logits * scale
    capped = softcap * torch.tanh(logits * (scale / softcap))
    return torch.where(logits == float("-inf"), logits, capped)


def map_slope(logits, scale: float, softcap: float):
    """`d map / dz` at the raw `logits`: `scale * (1 - tanh^2)`, 0 at `-inf`."""
    if softcap == 0.0:
        return torch.full_like(logits, scale)
    tanh = torch.tanh(logits * (scale / softcap))
    return scale * ((1.0 - tanh) * (1.0 + tanh))


def active_rows(labels, n_rows, vocab, ignore_index, device):
    """Rows whose label is a real token of the shared vocabulary (every row when there are no labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index) & (labels < vocab)
