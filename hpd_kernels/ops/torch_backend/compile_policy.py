"""When the torch backend's chunk math runs through `torch.compile` (inductor), and the wrapper that
runs it compiled or eagerly.

The per-chunk math (`divergence.py`, `hybrid.py`) runs through `torch.compile` where it pays: one
fused loop per row pass instead of one eager pass per elementwise op, for problems of at least
`COMPILE_MIN_ELEMENTS` logits (smaller ones would spend more time compiling than computing).
Compiling costs 3-20 s once per process (the low end with inductor's on-disk cache warm), more
than many calls take eagerly; so, as a JIT does, the process first runs `COMPILE_AFTER_ELEMENTS`
logits of such problems eagerly (a few seconds of work: a training step or two, or an evaluation
that never needs more), then compiles. That bounds what compiling can cost a short run, and the
switch point depends only on the sizes of the calls, not on timing, so a run is reproducible.
`HPD_KERNELS_TORCH_COMPILE`: "auto" (default: the rule above), "1" (compile at once, every size),
"0" (never). A compile that fails (no C++ compiler, an unsupported torch) warns once and leaves
eager for good. (Not `checks.compiling()`, which asks whether an outer `torch.compile` is tracing.)
"""

from __future__ import annotations

import os
import warnings

import torch

COMPILE_ENV = "HPD_KERNELS_TORCH_COMPILE"
COMPILE_MIN_ELEMENTS = 2**20
COMPILE_AFTER_ELEMENTS = 2**29
# Each compiled function holds one graph per (divergence, dtypes, vocabulary kind): more than
# dynamo's default of 8 entries per function; shapes are dynamic, so chunk sizes do not add any.
_RECOMPILE_LIMIT = 64


class _EagerWork:
    """Logits of compile-sized problems that this process has run eagerly (see above)."""

    elements = 0


def use_compiled_math(n_rows: int, vocab: int) -> bool:
    """Whether a call on `[n_rows, vocab]` logits runs the compiled chunk math (decided once per call,
    and counted towards `COMPILE_AFTER_ELEMENTS` when it does not)."""
    setting = os.environ.get(COMPILE_ENV, "auto")
    if setting == "0" or CompiledChunkMath.failed or torch.compiler.is_compiling():
        return False  # under an outer compile, the eager math is what it traces
    if setting == "1":
        return True
    if n_rows * vocab < COMPILE_MIN_ELEMENTS:
        return False
    if eager_phase_over():
        return True
    _EagerWork.elements += n_rows * vocab
    return False


def eager_phase_over() -> bool:
    """Whether this process is past the eager phase of the "auto" rule: its next compile-sized problem
    runs the compiled chunk math (for benchmarks, which time the steady state after it)."""
    if os.environ.get(COMPILE_ENV, "auto") != "auto" or CompiledChunkMath.failed:
        return True
    return _EagerWork.elements >= COMPILE_AFTER_ELEMENTS


def eager_elements() -> int:
    """Logits of compile-sized problems this process has run eagerly so far (the count of the rule)."""
    return _EagerWork.elements


class CompiledChunkMath:
    """`fn` through `torch.compile(dynamic=True)`, compiled on first use; called as `(use, *args)`,
    it runs `fn` itself where `use` is False or compiling has failed once."""

    failed = False  # shared: one failure turns every compiled function off (one warning)
    every = []      # every instance, in the order made (tests reset their compiled code)

    def __init__(self, fn):
        self.fn, self.compiled = fn, None
        CompiledChunkMath.every.append(self)

    def __call__(self, use, *args):
        if not use or CompiledChunkMath.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: eager from now on
            CompiledChunkMath.failed = True
            message = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"hpd_kernels: torch.compile of the torch backend's chunk math failed; using eager "
                          f"PyTorch from now on ({type(error).__name__}: {message})", RuntimeWarning, stacklevel=2)
            return self.fn(*args)
