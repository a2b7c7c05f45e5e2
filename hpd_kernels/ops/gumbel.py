"""Counter-based Gumbel noise, bit-identical in Triton and in PyTorch.

`y_hat = argmax_v (s_v / T + g(seed, row, v))` with `g` standard Gumbel is an exact draw from
`softmax(s / T)` that needs no softmax in memory, so it folds into the streaming log-sum-exp pass.
The noise is a pure function of `(seed, row, column)`: a row can be processed in any tile order,
on any backend, or split over vocabulary shards, and still draw the same token.

Bits: a 32-bit integer hash ("lowbias32", Wellons 2018, an avalanche-tested successor of
MurmurHash3's finaliser) keyed by seed and row, then applied per column. The top 23 bits give
`u = (k + 1/2) / 2^23`, strictly inside (0, 1) and exact in fp32 (with 24 bits, `k + 1/2` would
round up to 2^24 and give `u = 1`, an infinite Gumbel), so `-log(-log u)` is finite and lies in
[-2.81, 16.6]; the truncated tail affects only tokens with probability below ~1e-7 of the row's
mode.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_COLUMN_SALT = 0x9E3779B9


def seed_key(seed: int) -> int:
    """Fold a Python int seed (any size) into the 32-bit key the kernels take."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _lowbias32_int(_lowbias32_int(seed & _MASK32) ^ (seed >> 32))


def _lowbias32_int(h: int) -> int:
    h &= _MASK32
    h ^= h >> 16
    h = (h * _MUL1) & _MASK32
    h ^= h >> 15
    h = (h * _MUL2) & _MASK32
    h ^= h >> 16
    return h


def _lowbias32_torch(h: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic: products of two 32-bit values wrap in int64, but their low 32 bits are exact.
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MUL1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & _MASK32
    h = h ^ (h >> 16)
    return h


def row_keys_torch(key: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-row 32-bit keys for global row indices `rows` (int64)."""
    rows = rows.to(torch.int64)
    return _lowbias32_torch(_lowbias32_torch(key ^ (rows & _MASK32)) ^ (rows >> 32))


def _signed32(constant: int) -> int:
    return constant - (1 << 32) if constant >= (1 << 31) else constant


def _lowbias32_int32_(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int32 tensors: half the bytes of int64 and no temporaries per step.
    Products wrap modulo 2^32 as uint32 ones do; `>>` is arithmetic on int32, so the shifted-in
    sign bits are masked off to make it the logical shift of the uint32 original."""
    h ^= (h >> 16) & 0xFFFF
    h *= _signed32(_MUL1)
    h ^= (h >> 15) & 0x1FFFF
    h *= _signed32(_MUL2)
    h ^= (h >> 16) & 0xFFFF
    return h


def _gumbel_numpy(row_keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The CPU path: NumPy's uint32 shifts and products are several times faster than torch's."""
    column_hash = _lowbias32_torch(columns.to(torch.int64) + _COLUMN_SALT).numpy().astype(np.uint32)
    bits = row_keys.numpy().astype(np.uint32)[:, None] ^ column_hash[None, :]
    bits ^= bits >> 16
    bits *= np.uint32(_MUL1)
    bits ^= bits >> 15
    bits *= np.uint32(_MUL2)
    bits ^= bits >> 16
    return torch.from_numpy(gumbel_from_bits_numpy(bits))


def gumbel_from_bits_numpy(bits: np.ndarray) -> np.ndarray:
    uniform = (bits >> 9).astype(np.float32)
    uniform += np.float32(0.5)
    uniform *= np.float32(1.0 / 8388608.0)
    np.log(uniform, out=uniform)
    np.negative(uniform, out=uniform)
    np.log(uniform, out=uniform)
    np.negative(uniform, out=uniform)
    return uniform


def gumbel_from_bits_torch(bits: torch.Tensor) -> torch.Tensor:
    """`bits`: int32 holding uint32 values (see `_lowbias32_int32_`)."""
    uniform = ((bits >> 9) & 0x7FFFFF).to(torch.float32).add_(0.5).mul_(1.0 / 8388608.0)
    return uniform.log_().neg_().log_().neg_()


def gumbel_torch(row_keys: torch.Tensor, columns: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Gumbel noise `[rows, columns]` for keys `[rows]` and global column indices `[columns]`."""
    if row_keys.device.type == "cpu":
        return _gumbel_numpy(row_keys, columns).to(dtype)
    column_hash = _lowbias32_torch(columns.to(torch.int64) + _COLUMN_SALT)
    to_int32 = lambda values: torch.where(values >= (1 << 31), values - (1 << 32), values).to(torch.int32)
    bits = _lowbias32_int32_(to_int32(row_keys)[:, None] ^ to_int32(column_hash)[None, :])
    return gumbel_from_bits_torch(bits).to(dtype)


try:  # Triton is optional: the torch backend needs none of this.
    import triton
    import triton.language as tl

    @triton.jit
    def _lowbias32(h):
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        return h

    @triton.jit
    def row_keys_triton(key, rows):
        """`rows` int64 -> uint32 keys; `key` is `seed_key(seed)` (a scalar, i32 or i64)."""
        lo = (rows & 0xFFFFFFFF).to(tl.uint32)
        hi = (rows >> 32).to(tl.uint32)
        return _lowbias32(_lowbias32(key.to(tl.uint32) ^ lo) ^ hi)

    @triton.jit
    def gumbel_triton(row_keys, columns):
        """`row_keys` uint32 [R], `columns` int64 [C] -> fp32 Gumbel noise [R, C]."""
        column_hash = _lowbias32((columns + 0x9E3779B9).to(tl.uint32))
        return gumbel_from_bits(_lowbias32(row_keys[:, None] ^ column_hash[None, :]))

    @triton.jit
    def gumbel_from_bits(bits):
        uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return -tl.log(-tl.log(uniform))

except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    gumbel_triton = row_keys_triton = gumbel_from_bits = None
