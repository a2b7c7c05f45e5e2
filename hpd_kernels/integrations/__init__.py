"""Drop-ins for the trainers people use; each submodule imports its framework, nothing here does.

- `hpd_kernels.integrations.hf`: `DistillationTrainer`, a `transformers.Trainer` that distils a
  teacher into the student with any objective through the fused-linear losses, and
  `distillation_loss`, the same loss as a function of two models and a batch.
- `hpd_kernels.integrations.trl`: `GKDTrainer`, TRL's `GKDTrainer` with its
  `generalized_jsd_loss` computed by these kernels (same `beta`, `temperature`, masking and
  reductions), and that static function on its own.

Names are resolved lazily (`from hpd_kernels.integrations import DistillationTrainer` imports
`transformers` then, and only then).
"""

from __future__ import annotations

import importlib

_LOCATIONS = {
    "DistillationTrainer": "hf", "distillation_loss": "hf", "final_hidden_states": "hf",
    "GKDTrainer": "trl", "generalized_jsd_loss": "trl",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name):
    if name in _LOCATIONS:
        return getattr(importlib.import_module(f"{__name__}.{_LOCATIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
