"""TRL's GKD trainer with its loss computed by these kernels.

`generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
reduction="batchmean", num_items_in_batch=None)` has the signature of TRL's static
`GKDTrainer.generalized_jsd_loss` and returns the same number (tested against it):

- `beta` means the same in both: `beta * KL(p || m) + (1 - beta) * KL(q || m)` with
  `m = beta p + (1 - beta) q` (p the teacher, q the student), `beta = 0` forward KL `KL(p || q)`,
  `beta = 1` reverse KL `KL(q || p)` (both special-cased there as here). No mapping is needed.
- `temperature` divides both logits before the softmax, no `T^2` factor, in both.
- masking: rows whose label is `-100` are dropped (TRL masks exactly `-100`; any other label counts,
  so the labels are handed to the kernels as a mask).
- `reduction`: `"batchmean"` (TRL's default) is the sum over kept rows divided by their number
  (at least 1) with labels, by `student_logits.size(0)` (the batch size) without; `"sum"` the sum;
  `"mean"` TRL's `jsd.mean()` over its `[rows, vocab]` elements, so the sum divided by
  `rows * vocab`; `num_items_in_batch`, when given, divides the sum whatever the reduction.
  TRL's `"none"` returns `[rows, vocab]` terms, which these kernels never build: it is refused
  (`hpd_kernels.generalized_jsd_loss(..., reduction="none")` gives per-row values).

The differences: the result is accumulated in float32 (TRL: in the logits' dtype), and the teacher
logits get no gradient (TRL's trainer runs the teacher under `no_grad` anyway).

`GKDTrainer` is TRL's `GKDTrainer` with that function as its `generalized_jsd_loss`, and with a
`compute_loss` that skips the logits: the student's and teacher's final hidden states and lm_head
weights go to `fused_linear_jsd_loss` (see `hpd_kernels.integrations.hf.final_hidden_states`), with
each model's logit scale and soft cap read from its config (as the logits TRL's own path reads have them),
TRL's shift, masking and `num_items_in_batch` handling. As in TRL 1.16's `compute_loss`, the loss is
taken at temperature 1 (`GKDConfig.temperature` is the on-policy sampling temperature). Set
`fused_linear = False` (or call with `return_outputs=True`, as evaluation does) for TRL's own
`compute_loss`, which then calls the kernels on the full logits. Generation (`lmbda`, `seq_kd`) is TRL's.
"""

from __future__ import annotations

import torch

from .. import losses
from ..fused_linear import fused_linear_jsd_loss
from ..models.hf import logit_map_arguments
from .hf import _unwrap, batch_labels, final_hidden_states, lm_head_of

try:
    from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
except ImportError:   # trl < 0.26 exported it at the top level
    from trl import GKDTrainer as _TRLGKDTrainer

__all__ = ["GKDTrainer", "generalized_jsd_loss"]

_IGNORE = -100   # TRL's GKD masks this label value, not a configurable ignore_index


def _mask_labels(labels):
    """TRL's mask as labels for the kernels: 0 where kept (any id TRL keeps), -100 where dropped."""
    kept = labels != _IGNORE
    return kept, torch.where(kept, torch.zeros_like(labels), torch.full_like(labels, _IGNORE))


def _reduce(total, kept, batch, rows, vocab, reduction, num_items_in_batch):
    """TRL's reductions of the summed loss; `batch` is `logits.size(0)`, `rows` all leading elements."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "batchmean":
        return total / (kept.sum().clamp_min(1) if kept is not None else max(batch, 1))
    if reduction == "sum":
        return total
    if reduction == "mean":   # TRL: jsd.mean() over [kept rows, vocab] elements (NaN when there are none)
        count = kept.sum() if kept is not None else torch.tensor(rows * 1.0, device=total.device)
        return total / (count * vocab)
    raise ValueError(f"reduction must be 'batchmean', 'sum' or 'mean' (TRL's 'none' returns [rows, vocab] "
                     f"terms, which these kernels never build), got {reduction!r}")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's `GKDTrainer.generalized_jsd_loss`, computed by `hpd_kernels.generalized_jsd_loss`."""
    if reduction not in ("batchmean", "sum", "mean"):
        _reduce(None, None, 0, 0, 0, reduction, None)   # raises
    kept, kernel_labels = _mask_labels(labels) if labels is not None else (None, None)
    total = losses.generalized_jsd_loss(student_logits, teacher_logits, kernel_labels, beta=beta,
                                        temperature=temperature, reduction="sum")
    vocab = student_logits.shape[-1]
    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    return _reduce(total, kept, batch, student_logits.numel() // max(vocab, 1), vocab, reduction, num_items_in_batch)


class GKDTrainer(_TRLGKDTrainer):
    """TRL's `GKDTrainer`, its loss computed by the fused-linear JSD (no full logits)."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    fused_linear = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.fused_linear:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = batch_labels(inputs)
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        student_hidden, _ = final_hidden_states(model, model_inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden, _ = final_hidden_states(self.teacher_model, model_inputs)
        student_weight, student_bias = lm_head_of(model)
        teacher_weight, teacher_bias = lm_head_of(self.teacher_model)
        # TRL's causal shift: position i predicts token i + 1; its mask drops the -100 labels.
        kept, kernel_labels = _mask_labels(labels[:, 1:])
        total = fused_linear_jsd_loss(student_hidden[:, :-1], student_weight, teacher_hidden[:, :-1], teacher_weight,
                                      kernel_labels, beta=self.beta, student_bias=student_bias,
                                      teacher_bias=teacher_bias, reduction="sum",
                                      **logit_map_arguments(_unwrap(model).config, _unwrap(self.teacher_model).config))
        return _reduce(total, kept, kernel_labels.shape[0], kernel_labels.numel(), student_weight.shape[0], "batchmean",
                       num_items_in_batch)
