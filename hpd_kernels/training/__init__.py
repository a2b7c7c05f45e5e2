"""Distillation training on top of the losses (in progress: objectives; the loop comes next)."""

from .criteria import OBJECTIVES, distillation_loss, shifted_labels  # noqa: F401
