"""One resolved loss call, shared by both loss families: built once from checked arguments, then run
and finished.

`resolve` turns what the public function was given into a `LossCall`: the `Objective`, the backend
(chosen once: Triton, torch, or a vocabulary-parallel slice), flat labels, the active rows, HPD's
given `y_hat` or seed, the leading shape and the reduction. `LossCall.rows` (logits) and
`LossCall.linear` (hidden states + lm_head) run it into a `LossResult`, eagerly through the
autograd Functions or, under `torch.compile`, through the custom ops; `LossCall.finish` turns the
result into the requested reduction and `LossCall.details` into HPD's `HybridDetails`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .checks import check_sampled_ids, compiling
from .ops import backends, custom_ops
from .ops.backend_contract import Backend
from .ops.chunked_linear import FusedLinearDistillation, LinearInputs, StudentGrads
from .ops.common import active_rows
from .ops.row_losses import RowLosses, hybrid_details
from .registry import HPD, IDENTITY_MAPS, Objective


class HybridDetails(NamedTuple):
    """What HPD computed besides the loss, at no extra pass over the vocabulary.

    `sampled_ids`: y_hat, shape of `labels` (`ignore_index` on inactive rows);
    `label_weight`, `sample_weight`: the spec's `w_y` and `w_hat` (0 on inactive rows);
    `mismatch_rate`: fraction of active rows with `y_hat != y` (a 0-dim tensor, no device sync).
    """

    sampled_ids: torch.Tensor
    label_weight: torch.Tensor
    sample_weight: torch.Tensor
    mismatch_rate: torch.Tensor


class LossParts(NamedTuple):
    """The two terms of a loss with a hard-label term, each reduced as the loss is (detached, for
    logging): `loss = distillation + ce_weight * cross_entropy`. `cross_entropy` is the data's
    `-log softmax(s / T)[y]` per active row (the usual cross-entropy at T = 1)."""

    distillation: torch.Tensor
    cross_entropy: torch.Tensor


class LossResult(NamedTuple):
    """What `LossCall.rows` and `LossCall.linear` computed, before `LossCall.outputs` finishes it: the
    loss (per row, or reduced to `inner_reduction`), its parts per row (empty unless asked for) and
    HPD's details per row (empty, or None under `torch.compile`, for the divergences) and the student's
    entropy per row (empty unless asked for)."""

    loss: torch.Tensor
    distillation: torch.Tensor
    cross_entropy: torch.Tensor
    sampled_ids: Optional[torch.Tensor]
    label_weight: Optional[torch.Tensor]
    sample_weight: Optional[torch.Tensor]
    entropy: torch.Tensor


def _draw_seed():
    # Drawn from torch's generator, so torch.manual_seed makes the whole call reproducible.
    if compiling():
        raise ValueError("under torch.compile, pass seed= (or sampled_ids=) to HPD: drawing a seed would "
                         "read a tensor inside the graph")
    return int(torch.randint(0, 2**62, (1,)).item())


def _shared_seed(process_group, device):
    """One seed for every rank of the group: rank 0's draw (on `device`, the logits': an NCCL group
    communicates CUDA tensors only)."""
    import torch.distributed as dist

    drawn = torch.tensor([_draw_seed()], dtype=torch.int64, device=device)
    dist.broadcast(drawn, src=dist.get_global_rank(process_group, 0), group=process_group)
    return int(drawn.item())


def _vocab_parallel(process_group, vocab_offset, widths, names, backend, device) -> Optional[Backend]:
    """The vocabulary-parallel backend for this rank's slice, or None without a group. The slices
    are checked collectively (`slice_layout`), so every rank refuses a bad one alike."""
    if process_group is not None and compiling():
        raise ValueError("vocabulary-parallel losses (process_group) are not supported under torch.compile")
    if process_group is None:
        if vocab_offset is not None:
            raise ValueError("vocab_offset is only meaningful with process_group (a vocabulary-parallel group)")
        return None
    import torch.distributed as dist

    from .ops.vocab_parallel import VocabParallel, slice_layout

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    if backend == "triton":
        raise ValueError("vocabulary-parallel losses run the torch backend's math on each slice; use "
                         "backend='auto' or 'torch'")
    offset, global_vocab = slice_layout(process_group, widths, vocab_offset, names, device)
    return VocabParallel(process_group, offset, global_vocab)


@dataclass
class LossCall:
    objective: Objective
    backend: Backend                 # Triton, torch or a VocabParallel slice
    labels: Optional[torch.Tensor]   # [N] int64, or None (divergences without labels)
    active: torch.Tensor             # [N] bool: the rows in the loss
    sampled_ids: Optional[torch.Tensor]
    leading: torch.Size
    reduction: str
    num_items_in_batch: object
    process_group: object
    return_parts: bool = False

    @property
    def inner_reduction(self):
        """What the computation itself reduces to: a sum when `num_items_in_batch` divides it later."""
        return "sum" if self.num_items_in_batch is not None and self.reduction != "none" else self.reduction

    # -- running ---------------------------------------------------------------------------------

    def rows(self, student, teacher) -> LossResult:
        """The `LossResult` of `[N, V]` logits, per row."""
        if compiling():  # the custom op: opaque to the compiler, same implementation
            computed = custom_ops.run_row_losses(student, teacher.detach(), self.labels, self.active, self.sampled_ids,
                                                 self.objective, self.backend)
            if self.objective.is_hybrid:
                details = [detail.detach() for detail in hybrid_details(computed.stats, computed.sampled_ids)]
            else:
                details = (computed.sampled_ids.detach(), None, None)
            return LossResult(computed.loss, computed.distillation.detach(), computed.cross_entropy.detach(), *details,
                              computed.entropy.detach())
        return LossResult(*RowLosses.apply(student, teacher.detach(), self.labels, self.active, self.sampled_ids,
                                           self.objective, self.backend))

    def agree_chunk_size(self, chunk_size):
        """Vocabulary-parallel: the collectives run once per chunk, so every rank must cut the rows alike."""
        if self.process_group is None:
            return chunk_size
        import torch.distributed as dist

        agreed = torch.tensor(chunk_size, dtype=torch.int64, device=self.active.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.process_group)
        return int(agreed)

    def linear(self, inputs: LinearInputs, chunk_size) -> LossResult:
        """The `LossResult` of hidden states, its loss reduced to `inner_reduction`."""
        inputs = inputs._replace(labels=self.labels, sampled_ids=self.sampled_ids)
        if compiling():
            if self.reduction == "none":
                raise ValueError("under torch.compile the fused-linear losses support reduction='mean' or 'sum'")
            bias = inputs.student_bias
            wanted = StudentGrads(inputs.student_hidden.requires_grad, inputs.student_weight.requires_grad,
                                  bias is not None and bias.requires_grad)
            computed = custom_ops.run_fused_linear(inputs, self.active, self.objective, self.inner_reduction,
                                                   chunk_size, self.backend, wanted)
            return LossResult(computed.loss, computed.distillation, computed.cross_entropy, computed.sampled_ids,
                              computed.label_weight, computed.sample_weight, computed.entropy)
        return LossResult(*FusedLinearDistillation.apply(self.active, self.objective, self.inner_reduction, chunk_size,
                                                         self.backend, *inputs))

    # -- finishing -------------------------------------------------------------------------------

    def finish(self, value):
        """The requested reduction of per-row losses `[N]`, or of a loss already reduced to
        `inner_reduction`. `"mean"` is over this call's active rows, or over `num_items_in_batch`
        when given: the active tokens of the whole global batch (every rank, every accumulation
        step), so that per-call losses summed over ranks and micro-batches give the global mean."""
        if self.reduction == "none":
            return value.reshape(self.leading)
        if value.dim() == 1:  # per-row losses
            value = value.sum()
            if self.inner_reduction == "mean":
                return value / self.active.sum().clamp(min=1).to(value.dtype)
        if self.num_items_in_batch is not None:
            return value / torch.as_tensor(self.num_items_in_batch, device=value.device).to(value.dtype)
        return value

    def outputs(self, loss, distillation, cross_entropy, sampled_ids, label_weight, sample_weight, entropy, *,
                return_details=False):
        """The public return value from the fields of a `LossResult`: the finished loss, then
        `HybridDetails` (HPD, when asked), `LossParts` (when asked) and the student's entropy per row
        (shape of the leading dimensions, 0 outside the loss, when asked), in that order."""
        extra = ((self.details(sampled_ids, label_weight, sample_weight),) if return_details else ()) + (
            (self.parts(distillation, cross_entropy),) if self.return_parts else ()) + (
            (entropy.detach().reshape(self.leading),) if self.objective.entropy else ())
        loss = self.finish(loss)
        return (loss, *extra) if extra else loss

    def parts(self, distillation, cross_entropy):
        """`LossParts` of the per-row parts, each reduced as the loss is."""
        return LossParts(self.finish(distillation).detach(), self.finish(cross_entropy).detach())

    def details(self, drawn, w_label, w_sample):
        active, leading = self.active, self.leading
        mismatch = (active & (drawn != self.labels)).sum().to(torch.float32) / active.sum().clamp(min=1)
        return HybridDetails(drawn.reshape(leading), w_label.reshape(leading), w_sample.reshape(leading), mismatch)


def resolve(objective_name, *, labels, leading, n_rows, device, widths, names, temperature, ignore_index, reduction,
            backend, num_items_in_batch=None, process_group=None, vocab_offset=None, beta=0.5, alpha=0.1,
            sampled_ids=None, seed=None, fkl_weight=1.0, rkl_weight=1.0, ce_weight=0.0,
            return_parts=False, logit_maps=IDENTITY_MAPS, return_entropy=False) -> LossCall:
    """The `LossCall` of checked arguments. `widths` are the student's and the teacher's vocabularies
    (of this rank's slice with a `process_group`), `names` the arguments they came from."""
    if (ce_weight or return_parts) and labels is None:
        raise ValueError("ce_weight and return_parts need labels: the hard-label term is the cross-entropy of y")
    parallel = _vocab_parallel(process_group, vocab_offset, widths, names, backend, device)
    chosen = parallel if parallel is not None else backends.choose(backend, device)
    # The vocabulary labels index: the whole one across slices, else the shared one.
    vocab = parallel.global_vocab if parallel is not None else min(widths)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    active = active_rows(flat_labels, n_rows, vocab, ignore_index, device)
    if objective_name == HPD:
        if sampled_ids is not None:
            sampled_ids = check_sampled_ids(sampled_ids, leading, active, vocab)
        elif seed is None:
            seed = _draw_seed() if process_group is None else _shared_seed(process_group, device)
        objective = Objective.hybrid(temperature=temperature, ignore_index=ignore_index, seed=seed,
                                     fkl_weight=fkl_weight, rkl_weight=rkl_weight, ce_weight=ce_weight,
                                     cross_entropy=return_parts, logit_maps=logit_maps, entropy=return_entropy)
    else:
        objective = Objective.divergence(objective_name, temperature=temperature, ignore_index=ignore_index,
                                         beta=beta, alpha=alpha, ce_weight=ce_weight, cross_entropy=return_parts,
                                         logit_maps=logit_maps, entropy=return_entropy)
    return LossCall(objective, chosen, flat_labels, active, sampled_ids, leading, reduction, num_items_in_batch,
                    process_group, return_parts)
