"""Drop-ins for the trainers people use; each submodule imports its framework, nothing here does.

- `hpd_kernels.integrations.hf`: `DistillationTrainer`, a `transformers.Trainer` that distils a
  teacher into the student with any objective through the fused-linear losses, and
  `distillation_loss`, the same loss as a function of two models and a batch.
- `hpd_kernels.integrations.trl`: `GKDTrainer`, TRL's `GKDTrainer` with its
  `generalized_jsd_loss` computed by these kernels (same `beta`, `temperature`, masking and
  reductions), and that static function on its own.
- `hpd_kernels.integrations.trl_distillation`: `TRLDistillationTrainer` (the module's
  `DistillationTrainer`), TRL's `DistillationTrainer` (on-policy generation, tools, FSDP2) with
  its loss replaced by any of ours (`loss=`, `loss_options=`), and `logit_post_processing(config)`,
  a model's logit scale and soft cap as TRL reads them.

Names are resolved lazily (`from hpd_kernels.integrations import DistillationTrainer` imports
`transformers` then, and only then).
"""

from __future__ import annotations

import importlib

_LOCATIONS = {
    "DistillationTrainer": "hf", "distillation_loss": "hf", "final_hidden_states": "hf",
    "GKDTrainer": "trl", "generalized_jsd_loss": "trl",
    "TRLDistillationTrainer": ("trl_distillation", "DistillationTrainer"),
    "logit_post_processing": "trl_distillation",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name):
    if name in _LOCATIONS:
        module, attribute = _LOCATIONS[name] if isinstance(_LOCATIONS[name], tuple) else (_LOCATIONS[name], name)
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
