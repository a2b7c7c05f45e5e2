"""`registry.LogitMaps` inside the kernels: each side's logit is mapped as it is loaded (before the
temperature), `softcap * tanh(scale * z / softcap)` or `scale * z`, and the student's gradient is
chained through the map's slope where it is stored; nothing of size `[N, V]` holds mapped logits.

A map's kind is a constexpr (`IDENTITY`, `SCALE`, `SOFTCAP`), so that the identity maps compile to
the very code the kernels had before maps existed; its numbers travel in the kernels' scalars
tensor (`map_scalars`, three per side), so that no cap value costs a compile of its own.
"""

from __future__ import annotations

from .utils import HAS_TRITON, tanh, tl, triton

IDENTITY, SCALE, SOFTCAP = 0, 1, 2
# Scalars per side in `map_scalars`: scale, softcap, scale / softcap.
SIDE_SCALARS = 3


def map_code(scale: float, softcap: float) -> int:
    """The constexpr kind of one side's map."""
    if softcap != 0.0:
        return SOFTCAP
    return IDENTITY if scale == 1.0 else SCALE


def map_codes(logit_maps) -> dict:
    """The kernels' `STUDENT_MAP` and `TEACHER_MAP` constexprs."""
    return dict(STUDENT_MAP=map_code(logit_maps.student_scale, logit_maps.student_softcap),
                TEACHER_MAP=map_code(logit_maps.teacher_scale, logit_maps.teacher_softcap))


def side_scalars(scale: float, softcap: float) -> list:
    """`[scale, softcap, scale / softcap]` (0 for the last without a cap), for `load_map`."""
    return [float(scale), float(softcap), float(scale) / softcap if softcap != 0.0 else 0.0]


def map_scalars(logit_maps, student_only: bool = False) -> list:
    """Both sides' `side_scalars`, student first (the student's alone for a backward that reads no teacher)."""
    student = side_scalars(logit_maps.student_scale, logit_maps.student_softcap)
    return student if student_only else student + side_scalars(logit_maps.teacher_scale, logit_maps.teacher_softcap)


if HAS_TRITON:

    @triton.jit
    def load_map(scalars_ptr, MAP: tl.constexpr):
        """One side's `(scale, softcap, scale / softcap)` from `side_scalars` at `scalars_ptr`;
        nothing is read for the identity (the numbers are then unused)."""
        if MAP == 0:
            scale = 1.0
            softcap = 0.0
            ratio = 0.0
        else:
            scale = tl.load(scalars_ptr + 0)
            softcap = tl.load(scalars_ptr + 1)
            ratio = tl.load(scalars_ptr + 2)
        return scale, softcap, ratio

    @triton.jit
    def mapped(z, scale, softcap, ratio, MAP: tl.constexpr):
        """The map of the loaded logits `z`; `-inf` (masked lanes too) stays `-inf`."""
        if MAP == 1:
            out = z * scale
        elif MAP == 2:
            out = tl.where(z == float("-inf"), z, softcap * tanh(z * ratio))
        else:
            out = z
        return out

    @triton.jit
    def mapped_with_slope(z, scale, softcap, ratio, MAP: tl.constexpr):
        """The map of `z` (a non-identity map) and its slope `d map / dz` (0 at `-inf`: the tanh is
        -1 there), by which a gradient wrt the mapped logit becomes one wrt `z`."""
        if MAP == 2:
            t = tanh(z * ratio)
            out = tl.where(z == float("-inf"), z, softcap * t)
            slope = scale * ((1.0 - t) * (1.0 + t))
        else:
            out = z * scale
            slope = scale + tl.zeros_like(z)
        return out, slope

else:  # pragma: no cover - exercised only where triton is absent
    load_map = mapped = mapped_with_slope = None
