"""HPD's `y_hat` in the torch backend: the Gumbel-max draw of the Triton kernel, rounded as it rounds
it (always eager), so that both backends draw the same tokens from one seed."""

from __future__ import annotations

import torch

from ..gumbel import gumbel2_torch, row_keys_torch


def gumbel_scores(student, scale, row_keys, columns):
    """The kernel's Gumbel-max scores in base 2, `s log2(e) / T + g2` (float32), rounded as it rounds them."""
    return gumbel2_torch(row_keys, columns).add_((student.to(scale.dtype) * scale).float())


def sample_gumbel_max(student, row_ids, key, scale):
    """y_hat for the rows of unscaled logits whose indices in the batch are `row_ids` (the noise's
    keys); `scale` is log2(e) / T as a tensor of the accumulation dtype (the kernel's). Under a
    student logit map the caller passes the mapped chunk (`hybrid._sampled_logits`, in the
    accumulation dtype), so the draw is from the mapped student."""
    device = student.device
    scores = gumbel_scores(student, scale, row_keys_torch(key, row_ids), torch.arange(student.shape[1], device=device))
    return torch.argmax(scores, dim=-1)
