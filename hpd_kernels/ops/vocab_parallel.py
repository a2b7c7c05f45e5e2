"""Vocabulary-parallel losses: each rank of a process group holds a contiguous slice of the vocabulary.

`VocabParallel(group, vocab_offset, global_vocab)` is the torch backend (`ops.torch_backend`) over a
`VocabularySlice`: its passes unchanged, their row reductions made collective. So it is a backend
like the other two (`ops.backend_contract.Backend`), and `RowLosses` and the fused-linear Function
run unchanged on a slice. What crosses ranks is per-row scalars (and, fused-linear, the
`[tokens, hidden]` gradient of the hidden states), never a `[tokens, vocab]` tensor:

- log-sum-exps: a MAX all-reduce of the slice maxima, then a SUM all-reduce of the rescaled sums;
- divergences: the per-token terms need only the global log-sum-exps, so the row loss and the row
  sum of weights `W = sum_v w(v)` are SUM all-reduced partial sums; the gradient of a slice,
  `-(scale / T) (w - q W)`, is then local;
- HPD: `q(y), p(y)` are read by the rank that owns `y` and SUM all-reduced (zeros elsewhere);
  `y_hat` is the block draw of `ops/gumbel.py` over the whole vocabulary, its blocks and noise keyed
  by *global* columns: each rank scores the blocks its slice holds whole; a block that straddles
  slices (their offsets need not be multiples of P; a slice narrower than P may cut a block in
  three) is scored by every rank alike from its P logits, assembled by a SUM all-reduce of
  `[rows, straddling blocks, P]` (each column from its owner, zeros elsewhere), so its mass has the
  unsharded bits. The MAX all-reduce of the slices' best block scores, then a MIN all-reduce of the
  winning block, then the same for the columns of that block, draws the very token the unsharded
  backend draws for the same seed.

The row loss is replicated on every rank; each rank's gradient covers its slice only, so nothing is
double counted. Labels and sampled ids are global token ids.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from ..registry import IDENTITY_MAPS
from .gumbel import DRAW_BLOCK
from .torch_backend import TorchBackend
from .torch_backend.row_math import gathered_logits, logsumexp_parts
from .torch_backend.sampling import block_scores, in_block_scores, padded_blocks

# What `label_log_probs` refuses: the hard-label term's gradient would scatter global label ids
# into a slice's columns.
HARD_LABEL_REFUSAL = ("ce_weight and return_parts are not supported with process_group (vocabulary-parallel) yet; "
                      "add the cross-entropy term with a separate loss there")


class VocabularySlice:
    """The row reductions of the torch backend's passes over one rank's slice of the vocabulary
    (`ops.torch_backend.vocabulary.Vocabulary`): collectives on per-row scalars."""

    local_rows = False  # every row reduction is a collective: the compiled math covers only what lies between

    def __init__(self, group, vocab_offset, global_vocab):
        self.group, self.offset, self.global_vocab = group, int(vocab_offset), int(global_vocab)

    def _reduce(self, tensor, op):
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def label_vocab(self, width):
        return self.global_vocab  # labels are global ids; every slice cuts its chunks by it alike

    def row_sums(self, sums):
        return self._reduce(sums, dist.ReduceOp.SUM)

    def logsumexp(self, scaled):
        """Global row `(max, log_sum)` of a slice `[rows, V_local]`; `+inf` gives NaN as in the kernels."""
        return logsumexp_parts(
            scaled, row_sums=self.row_sums, row_max=lambda local_max: self._reduce(local_max.clone(), dist.ReduceOp.MAX))

    def top_column(self, student, log_sum_s, inv_temperature, logit_map=None):
        """None: the gradient's top-column identity needs the whole row (its sum over all slices)."""
        return torch.full_like(log_sum_s, -1.0)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        return torch.full_like(labels, -1)

    def _straddling_blocks(self, device):
        """The global ids of the draw's blocks that straddle two slices (those holding a slice's first
        column at a non-multiple of P), the same list on every rank: one all-gather of the offsets,
        on the first draw."""
        if getattr(self, "_straddling", None) is None:
            world = dist.get_world_size(self.group)
            offsets = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world)]
            dist.all_gather(offsets, torch.tensor(self.offset, dtype=torch.int64, device=device), group=self.group)
            self._straddling = sorted({int(o) // DRAW_BLOCK for o in offsets
                                       if int(o) % DRAW_BLOCK and 0 < int(o) < self.global_vocab})
        return self._straddling

    def _first_best(self, scores, ids):
        """Per row, the smallest of `ids` `[rows, K]` (-1: none) whose score is the largest over every
        rank's `scores`: the unsharded argmax's first maximum."""
        scores = torch.where(ids >= 0, scores, torch.full_like(scores, -math.inf))
        none = torch.full(ids.shape[:1], 2**62, dtype=torch.int64, device=ids.device)
        best = scores.amax(dim=-1) if ids.shape[1] else torch.full_like(none, -math.inf, dtype=scores.dtype)
        global_best = self._reduce(best.clone(), dist.ReduceOp.MAX)
        hit = (scores == global_best[:, None]) & (ids >= 0)
        candidate = torch.where(hit, ids, torch.full_like(ids, 2**62)).amin(dim=-1) if ids.shape[1] else none
        return self._reduce(candidate, dist.ReduceOp.MIN)

    def _straddling_logits(self, logits, straddling):
        """`[rows, K, P]`: the (mapped) logits of the K straddling blocks, each column from the rank
        that owns it (a SUM all-reduce of zeros elsewhere: `x + 0` is `x`), `-inf` past the vocabulary."""
        columns = torch.tensor(straddling, device=logits.device)[:, None] * DRAW_BLOCK + torch.arange(
            DRAW_BLOCK, device=logits.device)
        local = columns - self.offset
        owned = (local >= 0) & (local < logits.shape[1])
        values = logits[:, local.clamp(0, max(0, logits.shape[1] - 1))]
        shared = self.row_sums(torch.where(owned, values, torch.zeros_like(values)))
        return torch.where(columns < self.global_vocab, shared, torch.full_like(shared, -math.inf))

    def sample(self, student, row_ids, key, scale):
        """The global block draw (`ops/gumbel.py`): the best block over ranks, then the best column
        of it over ranks (the module's docstring)."""
        logits, device = student.to(scale.dtype), student.device
        straddling = self._straddling_blocks(device)
        first = self.offset // DRAW_BLOCK
        blocks = padded_blocks(logits, self.offset % DRAW_BLOCK)
        ids = torch.arange(first, first + blocks.shape[1], device=device)
        scores = block_scores(blocks, scale, key, row_ids, ids)
        straddled = torch.tensor(straddling, dtype=torch.int64, device=device)
        ids = torch.where(torch.isin(ids, straddled), -1, ids)  # scored below from every owner's columns
        if straddling:
            shared = block_scores(self._straddling_logits(logits, straddling), scale, key, row_ids, straddled)
            scores, ids = torch.cat([scores, shared], dim=1), torch.cat([ids, straddled])
        block = self._first_best(scores, ids.expand_as(scores))
        columns, owned, column_scores = in_block_scores(logits, block, scale, key, row_ids, self.offset,
                                                        self.global_vocab)
        return self._first_best(column_scores, torch.where(owned, columns, -1))

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature, logit_map=None):
        """`logits[row, id] / T` (mapped first by `logit_map`) read by the rank that owns `id`, summed
        over ranks (zeros elsewhere)."""
        owned, local = self.local_columns(ids, logits.shape[1])
        values = gathered_logits(logits[rows], local, acc_dtype, inv_temperature, logit_map)
        return self.row_sums(torch.where(owned, values, torch.zeros_like(values)))

    def local_columns(self, ids, width):
        """`(owned, local column)` of global token ids in this slice of `width` columns."""
        local = ids - self.offset
        return (ids >= self.offset) & (local < width), local.clamp(0, max(0, width - 1))


class VocabParallel(TorchBackend):
    """The torch backend on one slice of the vocabulary: its student and teacher logits cover the
    same columns (`slice_layout` checks that, on every rank, before a call reaches here)."""

    def __init__(self, group, vocab_offset, global_vocab):
        super().__init__(VocabularySlice(group, vocab_offset, global_vocab))
        self.global_vocab = self.vocabulary.global_vocab

    def label_log_probs(self, student, labels, stats, temperature, logit_maps=IDENTITY_MAPS):
        """Refused (`HARD_LABEL_REFUSAL`): only the hard-label term reads it."""
        raise ValueError(HARD_LABEL_REFUSAL)

    def reduce_hidden_grad(self, grad_hidden):
        """dL/dh sums the contributions of every vocabulary slice (fused-linear)."""
        return self.vocabulary.row_sums(grad_hidden)


# Offsets as `slice_layout` gathers them: not given (contiguous slices in rank order), or not a valid one.
DEFAULT_OFFSET, INVALID_OFFSET = -1, -2


def slice_layout(group, widths, vocab_offset, names, device):
    """`(vocab_offset, global_vocab)` of this rank's slice. `widths` are this rank's student and
    teacher slice widths, `names` the arguments they came from; without `vocab_offset` the slices are
    contiguous in rank order. Every rank gathers every rank's layout and checks all of it
    (`layout_problem`), so a bad slice on one rank raises the same error on every rank, where a
    local check would leave the others waiting in their next collective. The gathered tensor lives
    on `device`, the logits': an NCCL group communicates CUDA tensors only."""
    if vocab_offset is None:
        offset = DEFAULT_OFFSET
    elif isinstance(vocab_offset, numbers.Integral) and not isinstance(vocab_offset, bool) and 0 <= vocab_offset < 2**62:
        offset = int(vocab_offset)
    else:
        offset = INVALID_OFFSET
    mine = torch.tensor([int(widths[0]), int(widths[1]), offset], dtype=torch.int64, device=device)
    gathered = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    layout = [tuple(int(value) for value in row.tolist()) for row in gathered]
    problem = layout_problem(layout, names)
    if problem is not None:
        raise ValueError(f"vocabulary-parallel slices, as (student width, teacher width, vocab_offset) per rank "
                         f"{layout} (vocab_offset -1: not given): {problem}")
    rank = dist.get_rank(group)
    starts = [sum(width for width, _, _ in layout[:index]) for index in range(len(layout))]
    own = layout[rank][2] if layout[rank][2] != DEFAULT_OFFSET else starts[rank]
    return own, sum(width for width, _, _ in layout)


def layout_problem(layout, names=("student_logits", "teacher_logits")):
    """What is wrong with a group's vocabulary slices `[(student width, teacher width, offset)]` by
    rank, or None: each slice holds at least one column, the same on both sides, and the slices
    cover the vocabulary once (at their offsets if given, on every rank or on none)."""
    for rank, (student_width, teacher_width, offset) in enumerate(layout):
        if student_width != teacher_width:
            return (f"rank {rank}'s {names[0]} and {names[1]} must hold the same slice, got widths {student_width} "
                    f"and {teacher_width}")
        if student_width < 1:
            return f"rank {rank} holds an empty slice; every rank needs at least one column of the vocabulary"
        if offset == INVALID_OFFSET:
            return f"rank {rank}'s vocab_offset must be an integer in [0, 2**62)"
    given = [offset != DEFAULT_OFFSET for _, _, offset in layout]
    if any(given) and not all(given):
        return (f"vocab_offset is given on ranks {[rank for rank, has in enumerate(given) if has]} only; give it on "
                f"every rank or on none")
    if all(given):
        end = 0
        for offset, width, rank in sorted((offset, width, rank) for rank, (width, _, offset) in enumerate(layout)):
            if offset != end:
                return (f"the slices must cover the vocabulary from 0 once, without gaps or overlaps, but rank "
                        f"{rank}'s starts at {offset} where {end} was expected")
            end = offset + width
    return None
