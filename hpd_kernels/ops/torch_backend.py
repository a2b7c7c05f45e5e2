"""The same math as the Triton kernels, in plain PyTorch, for any device.

The torch backend: the same four entry points and outputs as the Triton backend (`ops/triton/`:
per-row loss, per-row stats, gradient written into a caller's buffer), so the autograd Functions do
not care which runs.
Rows are processed in chunks whose float32 temporaries stay under a fixed budget, so no
`[N, V]` float32 tensor exists here either; float64 inputs are computed in float64.

Each chunk's math is a plain function (`_divergence_chunk_forward`, `_divergence_chunk_backward`,
`_hybrid_chunk_backward`, ...) that runs through `torch.compile` (inductor: one fused C++ loop per
row pass instead of one eager pass per elementwise op) for problems of at least
`COMPILE_MIN_ELEMENTS` logits once the process has run `COMPILE_AFTER_ELEMENTS` of them eagerly,
compiled once per process with dynamic shapes, and eagerly otherwise or wherever compiling fails
(`_Compiled`). HPD's Gumbel-max draws always run eagerly: their
rounding is the Triton kernel's, bit for bit.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from ..registry import DIVERGENCE_STATS, HYBRID_STATS, STAT_LOG_SUM_S, STAT_MAX_S, STAT_TOP_S, accumulation_dtype
from .common import active_rows, temperature_scalars
from .gumbel import gumbel2_torch, row_keys_torch, seed_key

NAME = "torch"

# Bytes of one chunk's [rows, V] temporaries in the accumulation dtype. The divergences keep about
# eight of them alive at once, so 8 MiB each bounds a chunk's working set near 64 MiB.
CHUNK_BYTES = 8 * 2**20
# The same bound for the compiled chunks: their fused loops keep at most one or two [rows, V]
# buffers (a backward's gradient before it is copied out), so a chunk may hold 8x the rows. Fewer,
# larger chunks also mean fewer OpenMP barriers, which cost the most on a shared CPU.
COMPILED_CHUNK_BYTES = 8 * CHUNK_BYTES


# The per-chunk math runs through `torch.compile` (inductor) where it pays: one fused loop per row
# pass instead of one eager pass per elementwise op, for problems of at least
# `COMPILE_MIN_ELEMENTS` logits (smaller ones would spend more time compiling than computing).
# Compiling costs 3-20 s once per process (the low end with inductor's on-disk cache warm), more
# than many calls take eagerly; so, as a JIT does, the process first runs `COMPILE_AFTER_ELEMENTS`
# logits of such problems eagerly (a few seconds of work: a training step or two, or an evaluation
# that never needs more), then compiles. That bounds what compiling can cost a short run, and the
# switch point depends only on the sizes of the calls, not on timing, so a run is reproducible.
# `HPD_KERNELS_TORCH_COMPILE`: "auto" (default: the rule above), "1" (compile at once, every size),
# "0" (never). A compile that fails (no C++ compiler, an unsupported torch) warns once and leaves
# eager for good.
COMPILE_ENV = "HPD_KERNELS_TORCH_COMPILE"
COMPILE_MIN_ELEMENTS = 2**20
COMPILE_AFTER_ELEMENTS = 2**29
# Each compiled function holds one graph per (divergence, dtypes, vocabulary kind): more than
# dynamo's default of 8 entries per function; shapes are dynamic, so chunk sizes do not add any.
_RECOMPILE_LIMIT = 64


class _EagerWork:
    """Logits of compile-sized problems that this process has run eagerly (see above)."""

    elements = 0


def compiling(n_rows: int, vocab: int) -> bool:
    """Whether a call on `[n_rows, vocab]` logits runs the compiled chunk math (decided once per call,
    and counted towards `COMPILE_AFTER_ELEMENTS` when it does not)."""
    setting = os.environ.get(COMPILE_ENV, "auto")
    if setting == "0" or _Compiled.failed or torch.compiler.is_compiling():
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
    if os.environ.get(COMPILE_ENV, "auto") != "auto" or _Compiled.failed:
        return True
    return _EagerWork.elements >= COMPILE_AFTER_ELEMENTS


def eager_elements() -> int:
    """Logits of compile-sized problems this process has run eagerly so far (the count of the rule)."""
    return _EagerWork.elements


class _Compiled:
    """`fn` through `torch.compile(dynamic=True)`, compiled on first use; called as `(use, *args)`,
    it runs `fn` itself where `use` is False or compiling has failed once."""

    failed = False  # shared: one failure turns every compiled function off (one warning)

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, use, *args):
        if not use or _Compiled.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: eager from now on
            _Compiled.failed = True
            message = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"hpd_kernels: torch.compile of the torch backend's chunk math failed; using eager "
                          f"PyTorch from now on ({type(error).__name__}: {message})", RuntimeWarning, stacklevel=2)
            return self.fn(*args)


def _rows_per_chunk(vocab: int, acc_dtype: torch.dtype, compiled: bool = False) -> int:
    item = torch.finfo(acc_dtype).bits // 8
    return max(1, (COMPILED_CHUNK_BYTES if compiled else CHUNK_BYTES) // max(1, vocab * item))


def _zero_unless(condition, value):
    return torch.where(condition, value, torch.zeros_like(value))


def _zero_if(condition, value):
    """0 where `condition`; conditions test `== 0` so that NaN stays NaN (see the Triton twin)."""
    return torch.where(condition, torch.zeros_like(value), value)


def logsumexp_parts(scaled_logits, row_sums=lambda sums: sums, row_max=lambda local_max: local_max):
    """`(max, log_sum)` of each row, `lse = max + log_sum` kept apart (see `registry.STAT_MAX_S`):
    the max is 0 for a row of `-inf` only; a `+inf` logit gives NaN, as in the kernels (torch's own
    log-sum-exp gives +inf, which HPD's branches would then turn into a silent 0). `row_sums` and
    `row_max` combine the partial results of vocabulary slices."""
    if scaled_logits.shape[1]:
        local_max = scaled_logits.max(dim=-1).values
    else:
        local_max = scaled_logits.new_full((scaled_logits.shape[0],), -math.inf)
    reference = row_max(local_max)
    reference = torch.where(reference == -math.inf, torch.zeros_like(reference), reference)
    log_sum = row_sums((scaled_logits - reference[:, None]).exp().sum(-1)).log()
    return reference, torch.where(reference == math.inf, torch.full_like(log_sum, math.nan), log_sum)


def _defined(*row_log_sums):
    """Rows with a distribution on every side: a row whose logits are all `-inf` has
    `log_sum = -inf` and no softmax; it contributes 0 and gets no gradient. (A `+inf` logit's NaN
    is not `-inf`: it stays NaN.)"""
    defined = row_log_sums[0] != -math.inf
    for log_sum in row_log_sums[1:]:
        defined = defined & (log_sum != -math.inf)
    return defined


def _log_softmax(scaled_logits, row_max, row_log_sum):
    """The maximum first, as `log_softmax` does: no digits lost to a large `max`."""
    return (scaled_logits - row_max[:, None]) - row_log_sum[:, None]


def _logaddexp(a, b):
    larger = torch.maximum(a, b)
    reference = torch.where(larger == -math.inf, torch.zeros_like(larger), larger)
    return reference + torch.log(torch.exp(a - reference) + torch.exp(b - reference))


def _mixture_weight(log_mix):
    return math.exp(log_mix) if isinstance(log_mix, (int, float)) else log_mix.exp()


def divergence_terms(log_q, log_p, log_mix_p, log_mix_q, divergence):
    """Per-token value and weight `w` of one divergence (mirror of the Triton `divergence_terms`).
    The log mixture weights are Python floats or 0-d tensors (the compiled chunks' parameters)."""
    q, p = log_q.exp(), log_p.exp()
    if divergence == "forward_kl":
        value = _zero_if(p == 0, p * (log_p - log_q))
        return value, p
    if divergence == "reverse_kl":
        value = _zero_if(q == 0, q * (log_q - log_p))
        return value, -value
    if divergence == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(p - q)
    log_m = _logaddexp(log_mix_p + log_p, log_mix_q + log_q)
    if divergence == "jsd":
        mix_p, mix_q = _mixture_weight(log_mix_p), _mixture_weight(log_mix_q)
        value = (mix_p * _zero_if(p == 0, p * (log_p - log_m))
                 + mix_q * _zero_if(q == 0, q * (log_q - log_m)))
        weight = mix_q * _zero_if(q == 0, q * (log_m - log_q))
    elif divergence == "skew_forward_kl":
        value = _zero_if(p == 0, p * (log_p - log_m))
        # p * (q / m), the ratio from logs: it stays O(1) where q alone underflows to 0 (alpha -> 0).
        weight = _zero_if((log_p == -math.inf) | (log_q == -math.inf), p * torch.exp(log_mix_q + log_q - log_m))
    elif divergence == "skew_reverse_kl":
        value = _zero_if(q == 0, q * (log_q - log_m))
        weight = _zero_if(q == 0, q * (log_m - log_q + torch.exp(log_mix_q + log_q - log_m)))
    else:
        raise ValueError(divergence)
    return value, weight


def _parameters(temperature, log_mix_p=0.0, log_mix_q=0.0):
    """A compiled chunk's scalars as one float64 tensor `[1 / T, log_mix_p, log_mix_q]`: tensors, so
    that a new temperature or mixture weight reuses the compiled code."""
    return torch.tensor([1.0 / temperature, log_mix_p, log_mix_q], dtype=torch.float64)


def _scale(chunk, acc_dtype, inv_temperature):
    """`chunk / T` in the accumulation dtype; `inv_temperature` a 0-d tensor."""
    return chunk.to(acc_dtype) * inv_temperature.to(acc_dtype)


def _whole_row_logsumexp(scaled):
    """`logsumexp_parts` of whole rows, written so that inductor fuses it (no selection between the
    max and the sum): `(max, log_sum, raw max)`, the same numbers (a row of `-inf`: `x - max` is
    NaN, its sum's log replaced by `-inf`; a `+inf` logit: NaN, as there)."""
    raw_max = scaled.amax(dim=-1)
    log_sum = (scaled - raw_max[:, None]).exp().sum(-1).log()
    empty = raw_max == -math.inf
    return _zero_if(empty, raw_max), torch.where(empty, torch.full_like(log_sum, -math.inf), log_sum), raw_max


def _divergence_chunk_forward(student, teacher, params, divergence: str):
    """The whole forward of a chunk whose rows hold the whole vocabulary: row value, row weight and
    the stats `max_s, log_sum_s, max_t, log_sum_t` (compiled: a few fused row loops)."""
    acc_dtype = accumulation_dtype(student.dtype)
    s, t = _scale(student, acc_dtype, params[0]), _scale(teacher, acc_dtype, params[0])
    max_s, log_sum_s, _ = _whole_row_logsumexp(s)
    max_t, log_sum_t, _ = _whole_row_logsumexp(t)
    value, weight = divergence_terms(_log_softmax(s, max_s, log_sum_s), _log_softmax(t, max_t, log_sum_t),
                                     params[1], params[2], divergence)
    return value.sum(-1), weight.sum(-1), max_s, log_sum_s, max_t, log_sum_t


def _divergence_chunk_terms(s, t, max_s, log_sum_s, max_t, log_sum_t, params, divergence: str):
    """`[rows, 2]` sums of a chunk's values and weights over its columns, given the row stats (the
    elementwise part between a vocabulary slice's collectives; compiled)."""
    value, weight = divergence_terms(_log_softmax(s, max_s, log_sum_s), _log_softmax(t, max_t, log_sum_t),
                                     params[1], params[2], divergence)
    return torch.stack([value.sum(-1), weight.sum(-1)], dim=1)


def _write_gradient(out, chunk_grad, live, top, has_top: bool):
    """Write the gradient of the live rows into `out` (zeros elsewhere) and return, where `has_top`,
    each row's sum over all its columns and its value at its top column (`top >= 0`), both in the
    accumulation dtype, for `_top_from_others`: comparisons and one fused loop, no scatter."""
    chunk_grad = _zero_unless(live[:, None], chunk_grad)
    out.copy_(chunk_grad)
    if not has_top:
        return None
    columns = torch.arange(chunk_grad.shape[1], device=chunk_grad.device)
    is_top = columns[None, :] == top.to(torch.int64)[:, None]
    return torch.stack([chunk_grad.sum(-1), _zero_unless(is_top, chunk_grad).sum(-1)], dim=1)


def _top_from_others(out, top, sums):
    """Each row's top column (`top >= 0`) gets minus the sum of its other columns: a softmax
    gradient sums to 0, and `w - q W` at q near 1 would cancel large terms (the other columns are
    small there, so `row sum - top value` loses none of their digits). Where that sum is not finite
    (an infinite divergence) the column keeps its `w - q W` value (see the Triton twin)."""
    if sums is None:
        return
    rows = torch.nonzero(top >= 0)[:, 0]
    columns = top[rows].long()
    row_sum, top_formula = sums[rows].unbind(1)
    from_others = -(row_sum - top_formula)
    out[rows, columns] = torch.where(from_others.isfinite(), from_others, top_formula).to(out.dtype)


def _divergence_chunk_backward(out, student, teacher, stats, scale, params, divergence: str, has_top: bool):
    """A chunk's gradient `-(scale / T) (w - q W)` (compiled: one or two fused row loops)."""
    acc_dtype = stats.dtype
    s, t = _scale(student, acc_dtype, params[0]), _scale(teacher, acc_dtype, params[0])
    max_s, log_sum_s, top_s, max_t, log_sum_t, row_sum = stats.unbind(1)
    log_q = _log_softmax(s, max_s, log_sum_s)
    _, weight = divergence_terms(log_q, _log_softmax(t, max_t, log_sum_t), params[1], params[2], divergence)
    chunk_grad = (-params[0].to(acc_dtype) * scale)[:, None] * (weight - log_q.exp() * row_sum[:, None])
    # Inactive rows (scale 0) may hold NaN stats: select, do not multiply.
    live = (scale != 0) & _defined(log_sum_s, log_sum_t)
    return _write_gradient(out, chunk_grad, live, top_s, has_top)


def _hybrid_chunk_backward(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y, column_hat,
                           add_hat, params, has_top: bool):
    """A chunk's HPD gradient: `-(scale / T) (w_y [v = y] + w_hat [v = y_hat] - q (w_y + w_hat))`
    (compiled: the label and sample columns as comparisons, no scatter)."""
    acc_dtype = max_s.dtype
    live = (scale != 0) & _defined(log_sum_s)
    if not torch.compiler.is_compiling() and out.dtype == acc_dtype:
        return _hybrid_chunk_backward_eager(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y,
                                            column_hat, add_hat, params, has_top, live)
    q = _log_softmax(_scale(student, acc_dtype, params[0]), max_s, log_sum_s).exp()
    chunk_grad = -q * (w_y + w_hat)[:, None]
    columns = torch.arange(student.shape[1], device=student.device)[None, :]
    chunk_grad = chunk_grad + _zero_unless(columns == column_y[:, None], add_y[:, None])
    chunk_grad = chunk_grad + _zero_unless(columns == column_hat[:, None], add_hat[:, None])
    chunk_grad = (-params[0].to(acc_dtype) * scale)[:, None] * chunk_grad
    return _write_gradient(out, chunk_grad, live, top_s, has_top)


def _hybrid_chunk_backward_eager(out, student, max_s, log_sum_s, top_s, w_y, w_hat, scale, column_y, add_y,
                                 column_hat, add_hat, params, has_top, live):
    """`_hybrid_chunk_backward` as eager PyTorch runs it fastest: the same math, computed in place in
    `out` (which may be `student` itself: every step reads an element before writing it) in five
    passes and no temporaries, the two label columns as scatters instead of comparisons over whole
    rows; only the order in which a row's scalar factors are multiplied differs (one rounding). For
    `out` in the accumulation dtype."""
    coefficient = -params[0].to(out.dtype) * scale
    if params[0].item() == 1.0:
        torch.sub(student, max_s[:, None], out=out)
    else:
        torch.mul(student, params[0].to(out.dtype), out=out).sub_(max_s[:, None])
    out.sub_(log_sum_s[:, None]).exp_().mul_((coefficient * -(w_y + w_hat))[:, None])
    rows = torch.arange(out.shape[0], device=out.device)
    for column, add in ((column_y, add_y), (column_hat, add_hat)):
        out.index_put_((rows, column), coefficient * add, accumulate=True)
    dead = torch.nonzero(~live)[:, 0]
    if dead.numel():
        out.index_fill_(0, dead, 0.0)
    if not has_top:
        return None
    at_top = out.gather(1, top_s.clamp(min=0).to(torch.int64)[:, None])[:, 0]
    return torch.stack([out.sum(-1), torch.where(top_s >= 0, at_top, 0.0)], dim=1)


def _logsumexp_pair(student, teacher, params):
    """`[rows, 4]`: `max_s, log_sum_s, max_t, log_sum_t` of a chunk of whole rows (compiled)."""
    acc_dtype = accumulation_dtype(student.dtype)
    max_s, log_sum_s, _ = _whole_row_logsumexp(_scale(student, acc_dtype, params[0]))
    max_t, log_sum_t, _ = _whole_row_logsumexp(_scale(teacher, acc_dtype, params[0]))
    return torch.stack([max_s, log_sum_s, max_t, log_sum_t], dim=1)


_compiled_divergence_forward = _Compiled(_divergence_chunk_forward)
_compiled_divergence_terms = _Compiled(_divergence_chunk_terms)
_compiled_divergence_backward = _Compiled(_divergence_chunk_backward)
_compiled_hybrid_backward = _Compiled(_hybrid_chunk_backward)
_compiled_logsumexp_pair = _Compiled(_logsumexp_pair)


def _chunks(n_rows, vocab, acc_dtype, compiled=False):
    """Slices of rows; `compiled`: the larger chunks of the compiled math. Only where no collective
    runs per chunk: a vocabulary slice must cut its rows as every other rank does, whether or not
    compiling runs there."""
    step = _rows_per_chunk(vocab, acc_dtype, compiled)
    for begin in range(0, n_rows, step):
        yield slice(begin, min(begin + step, n_rows))


# Runs of at least this many rows outside the loss (a prompt's tokens, masked out) are skipped, as
# the kernels skip them; shorter gaps are computed with their neighbours (a chunk's call costs more
# than a few rows of work).
SKIP_MIN_ROWS = 16


def _live_spans(live):
    """`[(begin, end)]` row ranges that hold every `live` row, leaving out runs of at least
    `SKIP_MIN_ROWS` others. Only for CPU tensors: on a device, finding the runs would wait for it."""
    n_rows = live.shape[0]
    if live.device.type != "cpu" or bool(live.all()):
        return [(0, n_rows)]
    positions = torch.nonzero(live)[:, 0]
    if not positions.numel():
        return []
    breaks = torch.nonzero(positions[1:] - positions[:-1] > SKIP_MIN_ROWS)[:, 0]
    begins = [int(positions[0])] + (positions[breaks + 1]).tolist()
    ends = (positions[breaks] + 1).tolist() + [int(positions[-1]) + 1]
    return list(zip(begins, ends))


def _forward_spans(vocabulary, active, stats):
    """The row ranges a forward computes: where the rows are local, all but the runs outside the
    loss, whose stats name no top column (-1), so that the backward skips them too; under
    vocabulary parallelism every row, as every rank must cut its rows alike."""
    if not vocabulary.local_rows:
        return [(0, active.shape[0])]
    stats[:, STAT_TOP_S] = -1.0
    return _live_spans(active)


def _span_chunks(spans, vocab, acc_dtype, compiled=False):
    """`_chunks` of each span."""
    for begin, end in spans:
        for rows in _chunks(end - begin, vocab, acc_dtype, compiled):
            yield slice(begin + rows.start, begin + rows.stop)


def _scaled(logits, rows, vocab, acc_dtype, inv_temperature):
    """`logits / T` for a chunk in the accumulation dtype; a view, not a copy, when nothing changes
    (callers only read it)."""
    chunk = logits[rows, :vocab].to(acc_dtype)
    return chunk if inv_temperature == 1.0 else chunk * inv_temperature


class WholeVocabulary:
    """The row reductions of the forward passes when these logits hold the whole vocabulary.
    `VocabParallel` overrides them with collectives, so one implementation serves both."""

    # The row reductions are local: a chunk's whole forward may run as one compiled function.
    local_rows = True

    def label_vocab(self, width):
        """The vocabulary that labels index (chunking uses it too, so every slice cuts alike)."""
        return width

    def logsumexp(self, scaled):
        """`(max, log_sum)` per row (see `logsumexp_parts`)."""
        return logsumexp_parts(scaled)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        """HPD's column for `registry.STAT_TOP_S`: `y` or `y_hat`, whichever has q > 1/2 (only there
        can `w - q (w_y + w_hat)` cancel), else -1 (the Triton kernel's `hpd_pivot`)."""
        pivot = torch.where(log_q_y >= log_q_hat, labels, sampled_ids)
        return torch.where(torch.maximum(log_q_y, log_q_hat) > -math.log(2.0), pivot, torch.full_like(pivot, -1))

    def top_column(self, student, log_sum_s, inv_temperature):
        """The column whose gradient the backward derives from the others' (`registry.STAT_TOP_S`):
        the first argmax of `s / T` where q there exceeds 1/2, else -1. Only there can `w - q W`
        cancel (HPD's rule too, `hpd_pivot`): elsewhere the top column's own value is as accurate
        as the others', and a row without a top column costs the backward no sums.
        `q(top) = 1 / sum exp(s / T - max)`, so those rows are the ones with `log_sum < log 2`, and
        only they are read again here."""
        top = torch.full_like(log_sum_s, -1.0)
        rows = torch.nonzero(log_sum_s < math.log(2.0))[:, 0]
        if rows.numel():
            top[rows] = _scale(student[rows], log_sum_s.dtype, inv_temperature).argmax(dim=-1).to(top.dtype)
        return top

    def row_sums(self, sums):
        return sums

    def sample(self, student, first_row, key, scale):
        return sample_gumbel_max(student, first_row, key, scale)

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature):
        return _gather(logits, rows, ids, acc_dtype, inv_temperature)


WHOLE = WholeVocabulary()


def divergence_forward(student, teacher, labels, *, divergence, temperature, log_mix_p, log_mix_q, ignore_index,
                       vocabulary=WHOLE):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    inv_temperature = 1.0 / temperature
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, DIVERGENCE_STATS, dtype=acc_dtype, device=student.device)
    params = _parameters(temperature, log_mix_p, log_mix_q)
    fast = compiling(n_rows, vocab)
    spans = _forward_spans(vocabulary, active, stats)
    for rows in _span_chunks(spans, label_vocab, acc_dtype, compiled=fast and vocabulary.local_rows):
        if vocabulary.local_rows:
            row_value, row_weight, max_s, log_sum_s, max_t, log_sum_t = _compiled_divergence_forward(
                fast, student[rows, :vocab], teacher[rows, :vocab], params, divergence)
        else:
            s = _scaled(student, rows, vocab, acc_dtype, inv_temperature)
            t = _scaled(teacher, rows, vocab, acc_dtype, inv_temperature)
            (max_s, log_sum_s), (max_t, log_sum_t) = vocabulary.logsumexp(s), vocabulary.logsumexp(t)
            sums = _compiled_divergence_terms(fast, s, t, max_s, log_sum_s, max_t, log_sum_t, params, divergence)
            row_value, row_weight = vocabulary.row_sums(sums).unbind(1)
        top_s = vocabulary.top_column(student[rows, :vocab], log_sum_s, params[0])
        loss[rows] = _zero_unless(active[rows] & _defined(log_sum_s, log_sum_t), row_value)
        stats[rows] = torch.stack([max_s, log_sum_s, top_s, max_t, log_sum_t, row_weight], dim=1)
    return loss, stats


def divergence_backward(student, teacher, stats, row_scale, grad, *, divergence, temperature, log_mix_p, log_mix_q):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = stats.dtype
    inv_temperature = 1.0 / temperature
    params = _parameters(temperature, log_mix_p, log_mix_q)
    has_top = bool(n_rows) and bool((stats[:, STAT_TOP_S] >= 0).any())
    fast = compiling(n_rows, vocab)
    spans = _live_spans(row_scale != 0)
    for rows in _span_chunks(spans, vocab, acc_dtype, compiled=fast):
        out = grad[rows, :vocab]
        sums = _compiled_divergence_backward(fast, out, student[rows, :vocab], teacher[rows, :vocab], stats[rows],
                                             row_scale[rows].to(acc_dtype), params, divergence, has_top)
        _top_from_others(out, stats[rows, STAT_TOP_S], sums)
    _zero_outside(grad, spans)
    grad[:, vocab:] = 0
    return grad


def _zero_outside(grad, spans):
    """Zeros in the rows of `grad` that no span computed."""
    previous_end = 0
    for begin, end in spans + [(grad.shape[0], grad.shape[0])]:
        if begin > previous_end:
            grad[previous_end:begin].zero_()
        previous_end = end


def gumbel_scores(student, scale, row_keys, columns):
    """The kernel's Gumbel-max scores in base 2, `s log2(e) / T + g2` (float32), rounded as it rounds them."""
    return gumbel2_torch(row_keys, columns).add_((student.to(scale.dtype) * scale).float())


def sample_gumbel_max(student, first_row, key, scale):
    """y_hat for rows `first_row...` of unscaled logits; `scale` is log2(e) / T as a tensor of the
    accumulation dtype (the kernel's)."""
    device = student.device
    row_ids = torch.arange(first_row, first_row + student.shape[0], device=device)
    scores = gumbel_scores(student, scale, row_keys_torch(key, row_ids), torch.arange(student.shape[1], device=device))
    return torch.argmax(scores, dim=-1)


def _gather(logits, rows, ids, acc_dtype, inv_temperature):
    return logits[rows].gather(1, ids[:, None])[:, 0].to(acc_dtype) * inv_temperature


def hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, label_ids, sampled_ids, fkl_weight, rkl_weight):
    """HPD's per-row `(loss, w_y, w_hat)` from the four log-probabilities of `y` and `y_hat`
    (the spec's weights; shared with the vocabulary-parallel implementation)."""
    q_y, q_hat = log_q_y.exp(), log_q_hat.exp()
    d_y = _zero_if(q_y == 0, q_y * (log_p_y - log_q_y))
    d_hat = _zero_if(q_hat == 0, q_hat * (log_p_hat - log_q_hat))
    under, over = d_y > 0, d_hat < 0
    w_y = rkl_weight * d_y + _zero_unless(under, fkl_weight * log_p_y.exp() * torch.where(over, 2.0, 1.0))
    w_hat = _zero_unless(over & (sampled_ids != label_ids), rkl_weight * d_hat)
    per_row = -(_zero_if(w_y == 0, w_y * log_q_y) + _zero_if(w_hat == 0, w_hat * log_q_hat))
    return per_row, w_y, w_hat


def hybrid_forward(student, teacher, labels, sampled_ids, *, seed, temperature, fkl_weight, rkl_weight, ignore_index,
                   row_offset=0, vocabulary=WHOLE):
    n_rows, vocab = student.shape[0], min(student.shape[1], teacher.shape[1])
    acc_dtype = accumulation_dtype(student.dtype)
    inv_temperature = 1.0 / temperature
    label_vocab = vocabulary.label_vocab(vocab)
    active = active_rows(labels, n_rows, label_vocab, ignore_index, student.device)
    sample = sampled_ids is None
    key = seed_key(seed or 0)
    out_ids = torch.full((n_rows,), ignore_index, dtype=torch.int64, device=student.device)
    loss = torch.zeros(n_rows, dtype=acc_dtype, device=student.device)
    stats = torch.zeros(n_rows, HYBRID_STATS, dtype=acc_dtype, device=student.device)
    gather = vocabulary.gather
    # The kernel's score scale, rounded as it rounds it, so both backends draw the same tokens.
    scale = torch.tensor(temperature_scalars(temperature, acc_dtype)[0], dtype=acc_dtype, device=student.device)
    fast = compiling(n_rows, vocab) and vocabulary.local_rows
    spans = _forward_spans(vocabulary, active, stats)
    if fast:  # every row's log-sum-exps first, in the larger compiled chunks
        parts = torch.empty(n_rows, 4, dtype=acc_dtype, device=student.device)
        params = _parameters(temperature)
        for rows in _span_chunks(spans, label_vocab, acc_dtype, compiled=True):
            parts[rows] = _compiled_logsumexp_pair(fast, student[rows, :vocab], teacher[rows, :vocab], params)
    # Drawing y_hat keeps several [rows, V] temporaries (the noise's integer hashing): standard chunks.
    for rows in _span_chunks(spans, label_vocab, acc_dtype, compiled=fast and not sample):
        live = active[rows]
        if fast:
            max_s, log_sum_s, max_t, log_sum_t = parts[rows].unbind(1)
        else:
            max_s, log_sum_s = vocabulary.logsumexp(_scaled(student, rows, vocab, acc_dtype, inv_temperature))
            max_t, log_sum_t = vocabulary.logsumexp(_scaled(teacher, rows, vocab, acc_dtype, inv_temperature))
        if sample:
            chunk_ids = vocabulary.sample(student[rows, :vocab], row_offset + rows.start, key, scale)
        else:
            chunk_ids = sampled_ids[rows]
        safe_y = torch.where(live, labels[rows], 0)
        safe_hat = torch.where(live, chunk_ids, 0)
        log_q_y = (gather(student, rows, safe_y, acc_dtype, inv_temperature) - max_s) - log_sum_s
        log_p_y = (gather(teacher, rows, safe_y, acc_dtype, inv_temperature) - max_t) - log_sum_t
        log_q_hat = (gather(student, rows, safe_hat, acc_dtype, inv_temperature) - max_s) - log_sum_s
        log_p_hat = (gather(teacher, rows, safe_hat, acc_dtype, inv_temperature) - max_t) - log_sum_t
        per_row, w_y, w_hat = hpd_row_terms(log_q_y, log_p_y, log_q_hat, log_p_hat, safe_y, safe_hat, fkl_weight,
                                            rkl_weight)
        defined = live & _defined(log_sum_s, log_sum_t)
        loss[rows] = _zero_unless(defined, per_row)
        pivot = vocabulary.hpd_pivot(log_q_y, log_q_hat, safe_y, safe_hat).to(acc_dtype)
        # A row whose teacher has no distribution is marked as the student's would be (log_sum -inf):
        # the backward then leaves it out, hard-label term included.
        marked = torch.where(log_sum_t != -math.inf, log_sum_s, -math.inf)
        stats[rows] = torch.stack([max_s, marked, pivot, _zero_unless(defined, w_y), _zero_unless(defined, w_hat)],
                                  dim=1)
        out_ids[rows] = torch.where(live, chunk_ids, out_ids[rows])
    return loss, stats, (out_ids if sample else sampled_ids)


def label_log_probs(student, labels, stats, temperature):
    """`log q(y)` per row (natural units) from a forward's stats (the max and log-sum of the scaled
    logits): one gather, no vocabulary pass. Rows with `labels` outside `[0, V_s)` read column 0
    (the caller masks them)."""
    safe = torch.where((labels >= 0) & (labels < student.shape[1]), labels, 0)
    logits = student.gather(1, safe[:, None])[:, 0].to(stats.dtype) * (1.0 / temperature)
    return (logits - stats[:, STAT_MAX_S]) - stats[:, STAT_LOG_SUM_S]


def hybrid_backward(student, labels, sampled_ids, stats, row_scale, grad, *, vocab, temperature, to_local=None):
    """`to_local(ids) -> (owned, column)` maps token ids to this tensor's columns (a vocabulary
    slice, for the vocabulary-parallel implementation); by default every id is a column."""
    n_rows = student.shape[0]
    acc_dtype = stats.dtype
    inv_temperature = 1.0 / temperature
    params = _parameters(temperature)
    has_top = bool(n_rows) and bool((stats[:, STAT_TOP_S] >= 0).any())
    fast = compiling(n_rows, vocab)
    spans = _live_spans(row_scale != 0)
    for rows in _span_chunks(spans, vocab, acc_dtype, compiled=fast):
        scale = row_scale[rows].to(acc_dtype)
        max_s, log_sum_s, top_s, w_y, w_hat = stats[rows].unbind(1)
        live = (scale != 0) & _defined(log_sum_s)
        columns = []
        for ids, weight in ((labels[rows], w_y), (sampled_ids[rows], w_hat)):
            ids = torch.where(live, ids, 0)
            owned, column = (live, ids) if to_local is None else to_local(ids)
            columns += [column, _zero_unless(owned & live, weight)]
        out = grad[rows, :vocab]
        sums = _compiled_hybrid_backward(fast, out, student[rows, :vocab], max_s, log_sum_s, top_s, w_y, w_hat, scale,
                                         *columns, params, has_top)
        _top_from_others(out, top_s, sums)
    _zero_outside(grad, spans)
    grad[:, vocab:] = 0
    return grad
