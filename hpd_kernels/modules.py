"""`nn.Module` criteria over the functional losses, for trainers that want a loss object.
Constructor keywords are those of the functions (`process_group=`, `vocab_offset=` included);
`num_items_in_batch` is per call."""

from __future__ import annotations

import torch

from . import losses


class _Criterion(torch.nn.Module):
    _fn = None

    def __init__(self, *, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto", **extra):
        super().__init__()
        self.kwargs = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                           backend=backend, **extra)

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return type(self)._fn(student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch,
                              **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())


class ForwardKLLoss(_Criterion):
    _fn = staticmethod(losses.forward_kl_loss)


class ReverseKLLoss(_Criterion):
    _fn = staticmethod(losses.reverse_kl_loss)


class TVDLoss(_Criterion):
    _fn = staticmethod(losses.tvd_loss)


class GeneralizedJSDLoss(_Criterion):
    _fn = staticmethod(losses.generalized_jsd_loss)

    def __init__(self, beta=0.5, **kwargs):
        super().__init__(beta=beta, **kwargs)


class SkewForwardKLLoss(_Criterion):
    _fn = staticmethod(losses.skew_forward_kl_loss)

    def __init__(self, alpha=0.1, **kwargs):
        super().__init__(alpha=alpha, **kwargs)


class SkewReverseKLLoss(_Criterion):
    _fn = staticmethod(losses.skew_reverse_kl_loss)

    def __init__(self, alpha=0.1, **kwargs):
        super().__init__(alpha=alpha, **kwargs)


class HybridKLLoss(_Criterion):
    """HPD criterion. `forward(student_logits, teacher_logits, labels, sampled_ids=None, seed=None,
    num_items_in_batch=None)`; `process_group=` / `vocab_offset=` go to the constructor."""

    _fn = staticmethod(losses.hybrid_kl_loss)

    def __init__(self, fkl_weight=1.0, rkl_weight=1.0, return_details=False, **kwargs):
        super().__init__(fkl_weight=fkl_weight, rkl_weight=rkl_weight, return_details=return_details, **kwargs)

    def forward(self, student_logits, teacher_logits, labels, sampled_ids=None, seed=None, num_items_in_batch=None):
        return losses.hybrid_kl_loss(student_logits, teacher_logits, labels, sampled_ids=sampled_ids, seed=seed,
                                     num_items_in_batch=num_items_in_batch, **self.kwargs)
