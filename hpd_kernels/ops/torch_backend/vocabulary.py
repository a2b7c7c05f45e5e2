"""The torch backend's vocabulary strategy: the row reductions its passes make over a row's
vocabulary. `WholeVocabulary` computes them locally; `ops.vocab_parallel.VocabularySlice` makes them
collectives over the slices of a process group, so one implementation of the passes serves both."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .row_math import gathered_logits, logsumexp_parts, scale_chunk
from .sampling import sample_gumbel_max


class Vocabulary(Protocol):
    """What the passes of `divergence.py` and `hybrid.py` ask of the vocabulary their logits hold."""

    # Whether every row reduction is local: a chunk's whole forward may then run as one compiled
    # function, and rows outside the loss may be skipped (a slice must cut its rows as every rank).
    local_rows: bool

    def label_vocab(self, width: int) -> int:
        """The vocabulary that labels index (chunking uses it too, so every slice cuts alike)."""
        ...

    def logsumexp(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(max, log_sum)` per row of the whole vocabulary (see `row_math.logsumexp_parts`)."""
        ...

    def row_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-row partial sums made the whole vocabulary's."""
        ...

    def top_column(self, student: torch.Tensor, log_sum_s: torch.Tensor, inv_temperature,
                   logit_map=None) -> torch.Tensor:
        """The divergences' `registry.STAT_TOP_S` column per row, or -1 (`logit_map`: the student's,
        `row_math.side_maps`)."""
        ...

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids) -> torch.Tensor:
        """HPD's `registry.STAT_TOP_S` column per row, or -1."""
        ...

    def sample(self, student: torch.Tensor, row_ids: torch.Tensor, key: int, scale: torch.Tensor) -> torch.Tensor:
        """HPD's `y_hat` (token ids) of the rows whose indices in the batch are `row_ids`."""
        ...

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature, logit_map=None) -> torch.Tensor:
        """`logits[row, id] / T` of token ids, one per row, mapped first by `logit_map` (`row_math.side_maps`)."""
        ...

    def local_columns(self, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(owned, column)`: which token ids are columns of these `width`-wide logits, and where."""
        ...


class WholeVocabulary:
    """The row reductions when these logits hold the whole vocabulary: all local."""

    local_rows = True

    def label_vocab(self, width):
        return width

    def logsumexp(self, scaled):
        """`(max, log_sum)` per row (see `logsumexp_parts`)."""
        return logsumexp_parts(scaled)

    def hpd_pivot(self, log_q_y, log_q_hat, labels, sampled_ids):
        """HPD's column for `registry.STAT_TOP_S`: `y` or `y_hat`, whichever has q > 1/2 (only there
        can `w - q (w_y + w_hat)` cancel), else -1 (the Triton kernel's `hpd_pivot`)."""
        pivot = torch.where(log_q_y >= log_q_hat, labels, sampled_ids)
        return torch.where(torch.maximum(log_q_y, log_q_hat) > -math.log(2.0), pivot, torch.full_like(pivot, -1))

    def top_column(self, student, log_sum_s, inv_temperature, logit_map=None):
        """The column whose gradient the backward derives from the others' (`registry.STAT_TOP_S`):
        the first argmax of `s / T` where q there exceeds 1/2, else -1. Only there can `w - q W`
        cancel (HPD's rule too, `hpd_pivot`): elsewhere the top column's own value is as accurate
        as the others', and a row without a top column costs the backward no sums.
        `q(top) = 1 / sum exp(s / T - max)`, so those rows are the ones with `log_sum < log 2`, and
        only they are read again here."""
        top = torch.full_like(log_sum_s, -1.0)
        rows = torch.nonzero(log_sum_s < math.log(2.0))[:, 0]
        if rows.numel():
            scaled = scale_chunk(student[rows], log_sum_s.dtype, inv_temperature, logit_map)
            top[rows] = scaled.argmax(dim=-1).to(top.dtype)
        return top

    def row_sums(self, sums):
        return sums

    def sample(self, student, row_ids, key, scale):
        return sample_gumbel_max(student, row_ids, key, scale)

    def gather(self, logits, rows, ids, acc_dtype, inv_temperature, logit_map=None):
        return gathered_logits(logits[rows], ids, acc_dtype, inv_temperature, logit_map)

    def local_columns(self, ids, width):
        """Every token id is a column here."""
        return torch.ones_like(ids, dtype=torch.bool), ids


WHOLE = WholeVocabulary()
