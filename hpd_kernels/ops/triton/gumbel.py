"""The Triton half of the counter-based Gumbel noise and of HPD's block draw (`ops/gumbel.py` holds
the definition and the torch half): the same bits, computed inside the HPD forward kernel."""

from __future__ import annotations

from ..gumbel import BLOCK_DOMAIN, DRAW_BLOCK, LOG2_SERIES, LOG2_SERIES_FROM
from .utils import HAS_TRITON, fast_log2, tl, triton

if HAS_TRITON:
    # The series' coefficients and threshold, as the constexprs a kernel may read.
    _S1, _S2, _S3, _S4, _S5, _S6 = (tl.constexpr(coefficient) for coefficient in LOG2_SERIES)
    _FROM = tl.constexpr(LOG2_SERIES_FROM)
    DRAW_P = tl.constexpr(DRAW_BLOCK)
    _DOMAIN = tl.constexpr(BLOCK_DOMAIN)

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
    def gumbel2_triton(row_keys, columns):
        """`row_keys` uint32 [R], `columns` int32 [C] -> float32 base-2 Gumbel noise [R, C]."""
        column_bits = columns.to(tl.uint32) * 0x9E3779B9
        return gumbel2_from_bits(_lowbias32(row_keys[:, None] ^ column_bits[None, :]))

    @triton.jit
    def block_seed_key_triton(key):
        """`gumbel.block_seed_key`: the block noise's stream key from `seed_key(seed)`."""
        return _lowbias32(key.to(tl.uint32) ^ _DOMAIN)

    @triton.jit
    def gumbel2_at_triton(row_keys, columns):
        """`row_keys` uint32 [R], `columns` int32 [R, C] (each row its own) -> noise [R, C]."""
        return gumbel2_from_bits(_lowbias32(row_keys[:, None] ^ (columns.to(tl.uint32) * 0x9E3779B9)))

    @triton.jit
    def block_log2_masses(s, scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per block of DRAW_P columns of a tile `s` [BLOCK_N, BLOCK_V] (acc dtype), its base-2
        log-mass `r c + log2 sum 2^((s - r) c)` [BLOCK_N, BLOCK_V // DRAW_P] (acc dtype), `r` the
        block's max (0 where infinite). One reduction over the last axis of `[BLOCK_N, blocks, P]`:
        the interpreter's is NumPy's, which the torch backend repeats on the CPU (`ops/gumbel.py`)."""
        blocks = tl.reshape(s, [BLOCK_N, BLOCK_V // DRAW_P, DRAW_P])
        top = tl.max(blocks, axis=2)
        ref = tl.where(tl.abs(top) == float("inf"), 0.0, top)
        return ref * scale + fast_log2(tl.sum(tl.exp2((blocks - ref[:, :, None]) * scale), axis=2))

    @triton.jit
    def gumbel2_from_bits(bits):
        uniform = ((bits >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 0.99999994039535522
        v = 1.0 - uniform
        series = v * _S6 + _S5
        series = series * v + _S4
        series = series * v + _S3
        series = series * v + _S2
        series = series * v + _S1
        exponential = tl.where(uniform >= _FROM, series * v, -fast_log2(uniform))
        return -fast_log2(exponential)

else:  # pragma: no cover - exercised only where triton is absent
    gumbel2_triton = row_keys_triton = gumbel2_from_bits = block_seed_key_triton = gumbel2_at_triton = None
    block_log2_masses = DRAW_P = None
