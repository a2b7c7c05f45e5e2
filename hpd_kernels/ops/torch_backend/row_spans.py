"""Which rows the torch backend computes, and in which chunks.

Rows are processed in chunks whose temporaries stay under a fixed budget, so no `[N, V]` float32
tensor exists (float64 inputs are computed in float64). Like the kernels, the backend leaves out
runs of rows outside the loss (a prompt's tokens) where its rows are local.
"""

from __future__ import annotations

import torch

from ...registry import STAT_TOP_S

# Bytes of one chunk's [rows, V] temporaries in the accumulation dtype. The divergences keep about
# eight of them alive at once, so 8 MiB each bounds a chunk's working set near 64 MiB.
CHUNK_BYTES = 8 * 2**20
# The same bound for the compiled chunks: their fused loops keep at most one or two [rows, V]
# buffers (a backward's gradient before it is copied out), so a chunk may hold 8x the rows. Fewer,
# larger chunks also mean fewer OpenMP barriers, which cost the most on a shared CPU.
COMPILED_CHUNK_BYTES = 8 * CHUNK_BYTES

# Runs of at least this many rows outside the loss (a prompt's tokens, masked out) are skipped, as
# the kernels skip them; shorter gaps are computed with their neighbours (a chunk's call costs more
# than a few rows of work).
SKIP_MIN_ROWS = 16


def rows_per_chunk(vocab: int, acc_dtype: torch.dtype, compiled: bool = False) -> int:
    item = torch.finfo(acc_dtype).bits // 8
    return max(1, (COMPILED_CHUNK_BYTES if compiled else CHUNK_BYTES) // max(1, vocab * item))


def chunks(n_rows, vocab, acc_dtype, compiled=False):
    """Slices of rows; `compiled`: the larger chunks of the compiled math. Only where no collective
    runs per chunk: a vocabulary slice must cut its rows as every other rank does, whether or not
    compiling runs there."""
    step = rows_per_chunk(vocab, acc_dtype, compiled)
    for begin in range(0, n_rows, step):
        yield slice(begin, min(begin + step, n_rows))


def live_spans(live):
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


def forward_spans(vocabulary, active, stats):
    """The row ranges a forward computes: where the rows are local, all but the runs outside the
    loss, whose stats name no top column (-1), so that the backward skips them too; under
    vocabulary parallelism every row, as every rank must cut its rows alike."""
    if not vocabulary.local_rows:
        return [(0, active.shape[0])]
    stats[:, STAT_TOP_S] = -1.0
    return live_spans(active)


def span_chunks(spans, vocab, acc_dtype, compiled=False):
    """`chunks` of each span."""
    for begin, end in spans:
        for rows in chunks(end - begin, vocab, acc_dtype, compiled):
            yield slice(begin + rows.start, begin + rows.stop)


def zero_outside(grad, spans):
    """Zeros in the rows of `grad` that no span computed."""
    previous_end = 0
    for begin, end in spans + [(grad.shape[0], grad.shape[0])]:
        if begin > previous_end:
            grad[previous_end:begin].zero_()
        previous_end = end
