"""The objectives, defined once: names, kernel codes, parameters, and what a kernel saves per row.

Every other list of objectives (the public functions, the kernels' `DIVERGENCE` constexpr, the AOT
report, the CLI and trainer, the benchmarks and the tests) is derived from the names here. This
module imports no Triton, so the trainer, the CLI and `reference/` can read it anywhere.

One naming scheme in the API (`forward_kl`, ...); the short names (`fkl`, ...) exist only for the
CLI and the trainer's configs, mapped here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

HPD = "hpd"
# Order matters: a divergence's position is its kernel code (the kernels branch on it at compile time).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
OBJECTIVES = DIVERGENCES + (HPD,)
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}
# The mixture parameter of each divergence that has one (the public functions' keyword).
MIXTURE_PARAMETER = {"jsd": "beta", "skew_forward_kl": "alpha", "skew_reverse_kl": "alpha"}

# The CLI's and trainer's short names. `sft` (cross-entropy on the data, no teacher) is a
# training objective but not a distillation loss, so it has no library name.
SFT = "sft"
SHORT_NAMES = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd", "skl": "skew_forward_kl",
               "srkl": "skew_reverse_kl", "tvd": "tvd", "hpd": HPD}
TRAINING_OBJECTIVES = (SFT,) + tuple(SHORT_NAMES)

# Per-row stats a forward saves for its backward, the same columns in both backends. The student's
# (and for the divergences the teacher's) log-sum-exp is kept as two numbers, the row maximum of the
# scaled logits and the log of the sum relative to it, so that the backward forms
# `log q = (s / T - max) - log_sum` as `log_softmax` does: `s / T - lse` would lose the digits of a
# large maximum (|s / T| ~ 50 at low temperatures) in every log-probability. Units are the
# backend's own (the Triton kernels work in base 2); only the HPD weights are read by callers.
# `STAT_TOP_S` is a column (exact as a float below 2^24) or -1 for none: the backward writes that
# column as minus the sum of the others (a softmax gradient sums to 0), which avoids the
# cancellation of `w - q W` where q is near 1. The divergences take the student's first argmax
# where q there exceeds 1/2, the one place it can cancel (elsewhere minus the others' sum would put
# the rounding of ~V terms into a small q); HPD, whose weights sit on y and y_hat only, whichever
# of the two has q > 1/2. Both backends follow the same rule.
STAT_MAX_S, STAT_LOG_SUM_S, STAT_TOP_S = 0, 1, 2
STAT_MAX_T, STAT_LOG_SUM_T, STAT_ROW_WEIGHT = 3, 4, 5   # divergences
STAT_W_LABEL, STAT_W_SAMPLE = 3, 4                        # HPD: w_y, w_hat
DIVERGENCE_STATS, HYBRID_STATS = 6, 5                     # columns


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where losses, stats and weight gradients accumulate: float64 for float64 inputs (the
    exactness path the tests use), float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixture_logs(divergence: str, beta: float, alpha: float) -> tuple[str, float, float]:
    """Resolve the endpoints of JSD and the mixture `m = a p + b q` as `(divergence, log a, log b)`."""
    def log(x):
        return math.log(x) if x > 0 else -math.inf

    if divergence == "jsd":
        if beta == 0.0:
            return "forward_kl", 0.0, 0.0
        if beta == 1.0:
            return "reverse_kl", 0.0, 0.0
        return "jsd", log(beta), log(1.0 - beta)
    if divergence == "skew_forward_kl":  # m = alpha p + (1 - alpha) q
        return divergence, log(alpha), log(1.0 - alpha)
    if divergence == "skew_reverse_kl":  # m = alpha q + (1 - alpha) p
        return divergence, log(1.0 - alpha), log(alpha)
    return divergence, 0.0, 0.0


class LogitMaps(NamedTuple):
    """What each side's logits go through before the temperature: `z -> softcap * tanh(scale * z / softcap)`
    (Gemma's `final_logit_softcapping`, after a Cohere/Granite-style `logit_scale`), or `scale * z`
    where `softcap` is 0 (none). A `-inf` logit stays `-inf` (a masked column stays masked). The
    backends apply it as they read each logit and chain their gradient through it; nothing of size
    `[N, V]` holds the mapped logits."""

    student_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_scale: float = 1.0
    teacher_softcap: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY_MAPS

    @property
    def student_is_identity(self) -> bool:
        return self.student_scale == 1.0 and self.student_softcap == 0.0

    @property
    def teacher_is_identity(self) -> bool:
        return self.teacher_scale == 1.0 and self.teacher_softcap == 0.0


IDENTITY_MAPS = LogitMaps()


@dataclass(frozen=True)
class Objective:
    """What to compute per row: HPD or one (resolved) divergence, with its parameters. Built by
    `Objective.divergence(...)` or `Objective.hybrid(...)`; every layer below the public functions
    receives this one bundle."""

    name: str                 # HPD or a divergence resolved by `mixture_logs`
    temperature: float
    ignore_index: int
    log_mix_p: float = 0.0
    log_mix_q: float = 0.0
    seed: int = 0
    fkl_weight: float = 1.0
    rkl_weight: float = 1.0
    # The hard-label term `ce_weight * CE(y)`, CE at the same temperature (the spec's weights plus
    # `ce_weight` on y); `cross_entropy`: compute the per-row CE (for the term, or to report it).
    ce_weight: float = 0.0
    cross_entropy: bool = False
    # `LogitMaps`' fields, flat (the custom ops' schemas hold scalars only).
    student_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_scale: float = 1.0
    teacher_softcap: float = 0.0
    # The student's entropy per row (nats, of the q the loss uses), computed in the forward's own pass.
    entropy: bool = False

    @classmethod
    def divergence(cls, divergence, *, temperature, ignore_index, beta=0.5, alpha=0.1, ce_weight=0.0,
                   cross_entropy=False, logit_maps=IDENTITY_MAPS, entropy=False):
        name, log_mix_p, log_mix_q = mixture_logs(divergence, beta, alpha)
        return cls(name, float(temperature), int(ignore_index), log_mix_p, log_mix_q, ce_weight=float(ce_weight),
                   cross_entropy=bool(cross_entropy or ce_weight), **_map_fields(logit_maps), entropy=bool(entropy))

    @classmethod
    def hybrid(cls, *, temperature, ignore_index, seed, fkl_weight, rkl_weight, ce_weight=0.0, cross_entropy=False,
               logit_maps=IDENTITY_MAPS, entropy=False):
        return cls(HPD, float(temperature), int(ignore_index), seed=int(seed or 0), fkl_weight=float(fkl_weight),
                   rkl_weight=float(rkl_weight), ce_weight=float(ce_weight),
                   cross_entropy=bool(cross_entropy or ce_weight), **_map_fields(logit_maps), entropy=bool(entropy))

    @property
    def logit_maps(self) -> LogitMaps:
        return LogitMaps(self.student_scale, self.student_softcap, self.teacher_scale, self.teacher_softcap)

    @property
    def is_hybrid(self) -> bool:
        return self.name == HPD

    @property
    def stats_columns(self) -> int:
        return HYBRID_STATS if self.is_hybrid else DIVERGENCE_STATS


def _map_fields(logit_maps: LogitMaps) -> dict:
    return {name: float(value) for name, value in logit_maps._asdict().items()}
