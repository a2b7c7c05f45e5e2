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


def kernel_scalars(values, acc_dtype, device):
    """Float parameters travel in a tensor, not as kernel arguments: Triton passes Python floats
    as fp32, which would cap the float64 path's accuracy at ~1e-7."""
    return torch.tensor(values, dtype=acc_dtype, device=device)


# Base-2 arithmetic: the kernels scale logits by log2(e) / T once, so every exponential is one
# `ex2` of the special-function unit (`tl.exp` adds a multiply and denormal fix-ups) and every
# logarithm in the vocabulary loop one `lg2` (`tl.log` is a ~25-instruction polynomial).
from ..common import LOG2E  # noqa: F401  (re-exported: the kernels' wrappers scale by it)

if HAS_TRITON:
    LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: kernels may read no other globals

    if interpreter_enabled():

        @triton.jit
        def fast_log2(x):
            """log2; the interpreter has no libdevice, so there it is NumPy's exact log2."""
            return tl.log2(x)

    else:
        from triton.language.extra.cuda import libdevice

        @triton.jit
        def fast_log2(x):
            """log2: the hardware `lg2.approx` (relative error ~2^-22) in float32, exact in float64."""
            if x.dtype == tl.float32:
                return libdevice.fast_log2f(x)
            else:
                return tl.log2(x)

    @triton.jit
    def row_reference(running_max):
        """The reference a running max stands for: itself, or 0 for a row of `-inf` only (so that no
        `-inf - -inf` NaN appears)."""
        return tl.where(running_max == float("-inf"), 0.0, running_max)

    @triton.jit
    def online_logsumexp_step(running_max, running_sum, logits, scale):
        """One tile of an online base-2 log-sum-exp over axis 1 of `logits * scale` (`scale > 0`).

        The running max is of the unscaled logits, and every exponent is formed as
        `(logits - max) * scale`: the subtraction is exact for nearby values and the product is then
        small, so no digits of a large logit are lost (`logits * scale - max * scale` would round
        each product at the size of the logit, ~1e-5 at |s / T| ~ 100). Returns the new running max
        and sum, `2^((logits - reference) * scale)` for the tile and the factor that rescales any
        other running sum kept against the same reference. A row that has seen only `-inf` so far
        keeps a reference of 0, so no `-inf - -inf` NaN appears; `+inf` or NaN logits still give
        NaN, as the spec requires.
        """
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        reference = row_reference(new_max)
        rescale = tl.exp2((running_max - reference) * scale)
        exps = tl.exp2((logits - reference[:, None]) * scale)
        return new_max, running_sum * rescale + tl.sum(exps, axis=1), exps, rescale

    @triton.jit
    def lane_argmax_step(lane_max, lane_column, logits, cols):
        """Per lane (element of the tile), the largest logit so far and its first column: three
        instructions per element, where a per-tile argmax reduction costs ten."""
        better = logits > lane_max
        return tl.where(better, logits, lane_max), tl.where(better, cols[None, :], lane_column)

    @triton.jit
    def first_argmax(lane_max, lane_column, row_max):
        """The first column of each row's maximum, from the lanes (`row_max`: the row's maximum)."""
        return tl.min(tl.where(lane_max == row_max[:, None], lane_column, 2147483647), axis=1)

    @triton.jit
    def top_column_step(other_columns, grad, cols, top, in_range, width):
        """Backward, per tile: add the gradient of every column but the row's top one to per-lane
        sums, and the store mask that leaves the top column for `store_top_column`."""
        is_top = cols[None, :] == top[:, None]
        store_mask = in_range[:, None] & (cols[None, :] < width) & (cols[None, :] != top[:, None])
        return other_columns + tl.where(is_top, 0.0, grad), store_mask

    @triton.jit
    def store_top_column(grad_rows, top, other_columns, top_formula, in_range, top_slope, SLOPED: tl.constexpr):
        """The top column's gradient is minus the sum of the others' (a softmax gradient sums to 0):
        a difference of small terms, where `w - q W` at q near 1 would cancel large ones. Only rows
        whose stats name a top column (q there > 1/2, `registry.STAT_TOP_S`) pass `in_range`. Where that
        sum is not finite (an infinite divergence) the column keeps `top_formula`, its `w - q W`
        value `[BLOCK_N, 1]`, so non-finite rows read as they always did. The sums are of gradients
        wrt the mapped logits (`maps.py`); `SLOPED`: the result is chained through the map's slope
        at the top column, `top_slope` `[BLOCK_N, 1]`."""
        top_grad = 0.0 - tl.sum(other_columns, axis=1)[:, None]
        top_grad = tl.where(tl.abs(top_grad) < float("inf"), top_grad, top_formula)
        if SLOPED:
            top_grad = top_grad * top_slope
        tl.store(grad_rows + top[:, None], top_grad.to(grad_rows.dtype.element_ty), mask=in_range[:, None])

    @triton.jit
    def entropy_step(value, old_sum, rescale, shift, exps, gap):
        """One tile of `sum_v 2^((s - ref) scale) (s - ref)` kept against the running reference of
        `online_logsumexp_step` (moving it by `shift` moves every earlier gap by `-shift`), from that
        step's `exps`, `rescale` and the tile's `gap = s - ref`: then the entropy of `q = softmax(s / T)`
        is `ln Z - E_q[s - ref] / T`, two terms >= 0 (no cancellation). `-inf` columns weigh nothing."""
        moved = rescale * (value - tl.where(old_sum == 0, 0.0, shift * old_sum))
        return moved + tl.sum(tl.where(gap == float("-inf"), 0.0, exps * gap), axis=1)

    @triton.jit
    def tanh(x):
        """tanh to ~1-2 ulp in float32 and ~1e-16 relative in float64 (the interpreter has no
        libdevice): cephes' odd polynomial (float32) or rational function (float64) below |x| = 0.625,
        where `1 - 2 / (e^2x + 1)` would lose the relative accuracy; that form above it."""
        z = x * x
        if x.dtype == tl.float64:
            p = (-9.64399179425052238628E-1 * z - 9.92877231001918586564E1) * z - 1.61468768441708447952E3
            q = ((z + 1.12811678491632931402E2) * z + 2.23548839060100448583E3) * z + 4.84406305325125486048E3
            small = x + x * z * (p / q)
        else:
            p = (((-5.70498872745E-3 * z + 2.06390887954E-2) * z - 5.37397155531E-2) * z
                 + 1.33314422036E-1) * z - 3.33332819422E-1
            small = x + x * z * p
        # 2 log2(e) |x|: e^(2|x|) by one exp2; an overflow to inf gives 1, as it should.
        large = 1.0 - 2.0 / (tl.exp2(tl.abs(x) * 2.8853900817779268) + 1.0)
        large = tl.where(x < 0, -large, large)
        return tl.where(tl.abs(x) < 0.625, small, large)

    @triton.jit
    def finish_logsumexp(running_max, running_sum):
        """`(max, log2 sum)` of a finished online log-sum-exp: the two stats columns (the max of
        the unscaled logits, 0 for a row of `-inf` only)."""
        return row_reference(running_max), tl.log2(running_sum)

    @triton.jit
    def log2_softmax(logits, scale, scale_low, row_max, row_log_sum):
        """`log2 softmax(logits * scale)` from the stats, the maximum subtracted first, as in
        `log_softmax`. The scale is `scale + scale_low` (`temperature_scalars`): a float32
        `log2(e) / T` alone would put its own rounding, ~4e-8 |log2 q|, into every log-probability."""
        gap = logits - row_max
        return (gap * scale + gap * scale_low) - row_log_sum

else:  # pragma: no cover
    online_logsumexp_step = row_reference = lane_argmax_step = first_argmax = top_column_step = store_top_column = finish_logsumexp = log2_softmax = fast_log2 = LN2 = tanh = entropy_step = None
