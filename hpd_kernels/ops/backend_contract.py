"""The backend contract: what the autograd Functions, the fused-linear chunks and the custom ops may
call on a backend, written once.

Three backends implement all of it: the Triton kernels (`ops/triton/backend.py`), their torch twin
(`ops/torch_backend/`) and the torch backend on one vocabulary slice (`ops/vocab_parallel.py`),
which refuses by name what it cannot do yet. A backend is chosen once per call
(`ops.backends.choose`); `tests/test_backend_contract.py` holds each against this Protocol.

Shapes: `student` `[N, V_s]`, `teacher` `[N, V_t]` (the shared vocabulary is their first
`min(V_s, V_t)` columns; on a slice both are the same columns), `labels` and `sampled_ids` `[N]`
int64, `stats` `[N, registry.DIVERGENCE_STATS or HYBRID_STATS]` and per-row values in the
accumulation dtype (`registry.accumulation_dtype`). The stats' units are the backend's own: only the
backend that wrote them reads them (HPD's weights excepted, see `registry.STAT_*`).

`logit_maps` (`registry.LogitMaps`): each side's logits are mapped (`softcap * tanh(scale * z /
softcap)`, or `scale * z`) as they are read, before the temperature, and every gradient is chained
through the map (`dL/dz = dL/dz' * scale * (1 - tanh^2)`). `student`, `teacher` stay the raw logits,
the stats are those of the mapped ones. The identity maps must run the very same code as before
they existed (bit-identical results, `tests/test_bit_identical.py`).

`with_entropy=True`: the forward also returns the student's entropy per row, `-sum_v q log q` in
nats, of the `q` the loss uses (the shared vocabulary, mapped, at the temperature), in the
accumulation dtype, 0 on rows outside the loss; computed in the forward's own pass over the
student, never an extra one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

from ..registry import IDENTITY_MAPS, LogitMaps


class DivergenceForward(NamedTuple):
    """What a divergence forward computed: the loss per row (0 outside the loss) and the stats its
    backward reads."""

    loss: torch.Tensor
    stats: torch.Tensor
    entropy: Optional[torch.Tensor] = None


class HybridForward(NamedTuple):
    """What HPD's forward computed: the loss per row, the stats (with `w_y`, `w_hat`) and `y_hat`,
    drawn or the given `sampled_ids` (`ignore_index` on rows outside the loss when drawn)."""

    loss: torch.Tensor
    stats: torch.Tensor
    sampled_ids: torch.Tensor
    entropy: Optional[torch.Tensor] = None


@runtime_checkable
class Backend(Protocol):
    """Per-row losses, stats and gradients of one objective over a vocabulary."""

    # Carried by the `torch.compile` custom ops, whose schemas hold no objects, and turned back
    # into the backend by `ops.backends.by_name`.
    NAME: str

    def divergence_forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], *,
                           divergence: str, temperature: float, log_mix_p: float, log_mix_q: float,
                           ignore_index: int, logit_maps: LogitMaps = IDENTITY_MAPS,
                           with_entropy: bool = False) -> DivergenceForward:
        """A full-vocabulary divergence (`registry.DIVERGENCES`, resolved by `mixture_logs`) per row;
        `labels=None`: every row is in the loss."""
        ...

    def divergence_backward(self, student: torch.Tensor, teacher: torch.Tensor, stats: torch.Tensor,
                            row_scale: torch.Tensor, grad: torch.Tensor, *, divergence: str, temperature: float,
                            log_mix_p: float, log_mix_q: float,
                            logit_maps: LogitMaps = IDENTITY_MAPS) -> torch.Tensor:
        """Write `dL/ds` of the rows scaled by `row_scale` (0: no gradient) into `grad` `[N, V_s]`
        (it may be `student` itself) and return it."""
        ...

    def hybrid_forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                       sampled_ids: Optional[torch.Tensor], *, seed: Optional[int], temperature: float,
                       fkl_weight: float, rkl_weight: float, ignore_index: int,
                       row_ids: Optional[torch.Tensor] = None, logit_maps: LogitMaps = IDENTITY_MAPS,
                       with_entropy: bool = False) -> HybridForward:
        """HPD per row; `sampled_ids=None` draws `y_hat` from `seed` with the noise of each row's index
        in the whole batch, `row_ids` (int64 `[N]`; None: `0..N-1`), so a chunk, or a gather of rows,
        draws what the whole call would (drawn from the mapped student)."""
        ...

    def hybrid_backward(self, student: torch.Tensor, labels: torch.Tensor, sampled_ids: torch.Tensor,
                        stats: torch.Tensor, row_scale: torch.Tensor, grad: torch.Tensor, *, vocab: int,
                        temperature: float, logit_maps: LogitMaps = IDENTITY_MAPS) -> torch.Tensor:
        """HPD's `dL/ds` into `grad`, as `divergence_backward`; `vocab` is the shared vocabulary
        (columns past it get 0)."""
        ...

    def label_log_probs(self, student: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                        temperature: float, logit_maps: LogitMaps = IDENTITY_MAPS) -> torch.Tensor:
        """`log q(y)` per row (natural units) from a forward's stats: the hard-label term (the
        label's logit mapped by `logit_maps`' student side). Rows with `labels` outside `[0, V_s)`
        read column 0 (the caller masks them)."""
        ...

    def reduce_hidden_grad(self, grad_hidden: torch.Tensor) -> torch.Tensor:
        """The fused-linear `dL/dh` `[N, H]` of this backend's vocabulary made the whole one's, in
        place: unchanged where the backend holds the whole vocabulary."""
        ...
