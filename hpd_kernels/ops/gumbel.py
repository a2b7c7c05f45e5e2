"""Counter-based Gumbel noise, the same bits in Triton and in PyTorch: the definition and the torch
half here, the Triton half in `ops/triton/gumbel.py`; HPD's two-level draw of `y_hat` built on it.

`y_hat = argmax_v (s_v / T + g(seed, row, v))` with `g` standard Gumbel is an exact draw from
`softmax(s / T)` that needs no softmax in memory. The noise is a pure function of `(seed, row,
column)`: a row can be processed in any tile order, on any backend, or split over vocabulary
shards, and still draw the same token.

The draw (issue 23 item 2) makes noise for one block of columns per row, not for every column. The
vocabulary is cut into fixed blocks of `DRAW_BLOCK` (P = 16) global columns, `[bP, (b + 1) P)`, the
last one cut short by the (shared) vocabulary's end; P does not depend on any kernel's tile width
(every tile width is a multiple of P, so a tile holds whole blocks). Then

1. per block, its base-2 log-mass `m_b = r_b c + log2(sum_{v in b} 2^((s_v - r_b) c))`, with
   `c = log2(e) / T` and `r_b` the block's largest logit (0 where that is infinite), in the
   accumulation dtype, from the block's own P logits only: the same value whatever the tile or
   chunk (`block_log2_masses`, here and in `ops/triton/gumbel.py`). The sum over a block is one
   reduction over the last axis of `[rows, blocks, P]`: on the CPU NumPy's (the interpreter's, and
   the torch backend's there), so the same bits on both backends; on a GPU the compiler's order in
   the kernel and a fixed tree of adjacent pairs in the torch backend (so that vocabulary slices
   reproduce the whole vocabulary's bits there too);
2. the block `b* = argmax_b (m_b + g2_block(seed, row, b))` (first on ties), with block noise from
   its own stream: the noise below for the key `block_seed_key(key)` in place of `key` and the block
   index in place of the column, so it is as independent of the column noise as two seeds' noise is;
3. `y_hat = argmax_{v in b*} (s_v c + g2(seed, row, v))`, the column noise of only P columns.

Exact in distribution: `P(b*) = Z_b / Z` and `P(v | b*) = 2^(s_v c) / Z_b`, so `P(v) = softmax(s / T)_v`.
A block of -inf logits has mass -inf and is never drawn (unless the whole row is -inf: then the
row has no distribution and draws column 0, as before). The Triton kernel takes the masses during
its online pass and reads the chosen block's P logits once more after it; a tile whose largest
logit cannot lift any of its blocks above the best block so far (`m_b <= r_b c + log2 P`, the
noise at most `GUMBEL2_MAX`) skips its masses. Vocabulary slices (`ops/vocab_parallel.py`) use the
global block and column ids; a block that straddles two slices is scored from its P logits,
gathered across the ranks.

The kernels work in base 2, so the noise is too: with `s2 = s log2(e) / T`,
`argmax(s2 + g2)` where `g2 = -log2(-log2 u) = log2(e) g + const` is the same draw (a positive
multiple of the score plus a constant has the same argmax).

Bits: a 32-bit integer hash ("lowbias32", Wellons 2018, an avalanche-tested successor of
MurmurHash3's finaliser) keyed by seed and row, then applied once per element to the row key xor
`column * 0x9E3779B9` (a bijection of the column, spread over all 32 bits, so two rows' keys never
make one row's noise a shift or permutation of another's). The top 23 bits give
`u = (k + 1/2) / 2^23`, strictly inside (0, 1), built as a float from the bits (no int-to-float
conversion): `bits(1 + k 2^-23) - (1 - 2^-24)` is exact. So `g2` is finite and lies in
[-4.59, 23.48]; the truncated tail affects only tokens with probability below ~1e-7 of the row's
mode. The inner `e = -log2 u` is the hardware `lg2` for u < 15/16 and, above, the series
`-log2(1 - v) = (v + v^2/2 + ... + v^6/6) / ln 2` in `v = 1 - u` (exact by Sterbenz; truncation
below 3e-9 relative): near u = 1, e is tiny and `lg2`'s absolute error (2^-22.6) would dominate
it. The outer `-log2 e` is the hardware `lg2`; both errors stay near a float32 score's rounding. So
on a GPU the Triton draws can differ from the torch backend's in rare near-ties (scores or block
masses within ~1e-6; the masses' `exp2`/`log2` are the hardware's there); on the CPU (the
interpreter, whose `exp2`/`log2` are NumPy's, which the torch backend uses on the CPU too) they
are bit-identical.
"""

from __future__ import annotations

import os

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B
_COLUMN_MUL = 0x9E3779B9
_ONE_MINUS_HALF_ULP = 1.0 - 2.0**-24   # exact in float32
# The largest g2: u = 1 - 2^-24 (with a margin for the float32 rounding of both logs).
GUMBEL2_MAX = 23.5
# -log2(1 - v) = sum_k v^k / (k ln 2): the series' coefficients (float32), used from u = 15/16 up.
LOG2_SERIES_FROM = 0.9375
LOG2_SERIES = [float(np.float32(1.0 / (k * 0.6931471805599453))) for k in range(1, 7)]
# The draw's blocks of columns (a power of two; every kernel tile width is a multiple of it).
DRAW_BLOCK = 16
LOG2_DRAW_BLOCK = 4
assert DRAW_BLOCK == 1 << LOG2_DRAW_BLOCK
# What the block noise's key is xor-ed with before its hash (`block_seed_key`): its own stream.
BLOCK_DOMAIN = 0x2545F491


def seed_key(seed: int) -> int:
    """Fold a Python int seed (any size) into the 32-bit key the kernels take."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _lowbias32_int(_lowbias32_int(seed & _MASK32) ^ (seed >> 32))


def block_seed_key(key: int) -> int:
    """The key of the block noise's stream, from the column noise's `seed_key(seed)`."""
    return _lowbias32_int(key ^ BLOCK_DOMAIN)


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


def _gumbel2_numpy_block(keys: np.ndarray, column_bits: np.ndarray) -> np.ndarray:
    bits = keys[:, None] ^ column_bits  # `column_bits` [C] (every row's) or [R, C] (each row its own)
    bits ^= bits >> 16
    bits *= np.uint32(_MUL1)
    bits ^= bits >> 15
    bits *= np.uint32(_MUL2)
    bits ^= bits >> 16
    return gumbel2_from_bits_numpy(bits)


# Rows per block of the CPU path: a block's uint32/float32 temporaries stay in a core's cache.
_NUMPY_BLOCK_ROWS = 8


class _Threads:
    """The CPU path's thread pool, made on first use; made again in a forked child (whose copy of
    the pool has no threads) or when torch is given more threads."""

    pool, workers, pid = None, 0, None

    @classmethod
    def map(cls, fn, items, workers):
        if cls.pool is None or cls.pid != os.getpid() or cls.workers < workers:
            from concurrent.futures import ThreadPoolExecutor

            cls.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpd_kernels_gumbel")
            cls.workers, cls.pid = workers, os.getpid()
        return list(cls.pool.map(fn, items))


def _gumbel2_numpy(row_keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The CPU path: NumPy's uint32 shifts and products are several times faster than torch's. NumPy
    runs on one core and releases the GIL, so blocks of rows go to as many threads as torch uses
    (each element is computed alone: the same bits however the rows are split)."""
    column_bits = columns.numpy().astype(np.uint32) * np.uint32(_COLUMN_MUL)
    keys = row_keys.numpy().astype(np.uint32)
    out = np.empty((keys.shape[0], column_bits.shape[0]), dtype=np.float32)

    def block(begin):
        rows = slice(begin, begin + _NUMPY_BLOCK_ROWS)
        out[rows] = _gumbel2_numpy_block(keys[rows], column_bits)

    starts = range(0, keys.shape[0], _NUMPY_BLOCK_ROWS)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        _Threads.map(block, starts, workers)
    else:
        for begin in starts:
            block(begin)
    return torch.from_numpy(out)


def _series(v):
    """`-log2(1 - v)` for `0 < v <= 1/16`, Horner in the kernel's order (NumPy or torch, float32)."""
    series = v * LOG2_SERIES[5] + LOG2_SERIES[4]
    for coefficient in (LOG2_SERIES[3], LOG2_SERIES[2], LOG2_SERIES[1], LOG2_SERIES[0]):
        series = series * v + coefficient
    return series * v


def gumbel2_from_bits_numpy(bits: np.ndarray) -> np.ndarray:
    uniform = ((bits >> 9) | np.uint32(0x3F800000)).view(np.float32) - np.float32(_ONE_MINUS_HALF_ULP)
    exponential = np.where(uniform >= np.float32(LOG2_SERIES_FROM), _series(np.float32(1.0) - uniform), -np.log2(uniform))
    return -np.log2(exponential)


def gumbel2_from_bits_torch(bits: torch.Tensor) -> torch.Tensor:
    """`bits`: int32 holding uint32 values (see `_lowbias32_int32_`)."""
    uniform = (((bits >> 9) & 0x7FFFFF) | 0x3F800000).view(torch.float32) - _ONE_MINUS_HALF_ULP
    exponential = torch.where(uniform >= LOG2_SERIES_FROM, _series(1.0 - uniform), -torch.log2(uniform))
    return -torch.log2(exponential)


def gumbel2_torch(row_keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Base-2 Gumbel noise `[rows, columns]` (float32) for keys `[rows]` and global column indices `[columns]`."""
    if row_keys.device.type == "cpu":
        return _gumbel2_numpy(row_keys, columns)
    to_int32 = lambda values: torch.where(values >= (1 << 31), values - (1 << 32), values).to(torch.int32)
    column_bits = to_int32((columns.to(torch.int64) * _COLUMN_MUL) & _MASK32)
    bits = _lowbias32_int32_(to_int32(row_keys)[:, None] ^ column_bits[None, :])
    return gumbel2_from_bits_torch(bits)


def gumbel2_at_torch(row_keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Noise `[rows, C]` (float32) at global column indices `columns` `[rows, C]`, each row its own."""
    if row_keys.device.type == "cpu":
        column_bits = columns.numpy().astype(np.uint32) * np.uint32(_COLUMN_MUL)
        return torch.from_numpy(_gumbel2_numpy_block(row_keys.numpy().astype(np.uint32), column_bits))
    to_int32 = lambda values: torch.where(values >= (1 << 31), values - (1 << 32), values).to(torch.int32)
    column_bits = to_int32((columns.to(torch.int64) * _COLUMN_MUL) & _MASK32)
    return gumbel2_from_bits_torch(_lowbias32_int32_(to_int32(row_keys)[:, None] ^ column_bits))
