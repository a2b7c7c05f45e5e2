"""Fused-linear losses: pass hidden states and lm_head weights; the logits exist one chunk at a time.

`fused_linear_hybrid_kl_loss` and `fused_linear_divergence_loss(divergence=...)` (with one named
function per divergence) check their arguments, resolve one `LossCall` exactly as the logits-level
losses do (`checks`, `calls`), and run it through `ops.chunked_linear`, which reuses the very
kernels of the logits-level losses. The teacher is given as hidden states + weight (+ bias), or as
precomputed `teacher_logits`. Gradients flow to the student's hidden states, weight and bias.
"""

from __future__ import annotations

import contextlib

import torch

from .calls import resolve
from .checks import (check_ce_weight, check_chunk_size, check_divergence, check_flag, check_fraction,
                     check_hpd_options, check_labels, check_linear, check_linear_teacher, check_logit_maps,
                     check_num_items, check_options)
from .ops.chunked_linear import LinearInputs, rows_per_chunk
from .registry import HPD


def _autocast_dtype(device):
    """The dtype `torch.autocast` computes GEMMs in on `device`, or None where it is off."""
    if device is None or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _run(objective_name, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         teacher_logits, labels, *, labels_required, temperature, ignore_index, reduction, chunk_size, backend,
         num_items_in_batch, process_group, vocab_offset, **options):
    """Check the tensors, resolve the call and run it: `(call, LossResult)` (`LossCall.linear`)."""
    device = getattr(student_hidden, "device", None)
    autocast = _autocast_dtype(device)
    sliced = process_group is not None   # a slice's width is checked on every rank together (slice_layout)
    check_linear("student", student_hidden, student_weight, student_bias, device, autocast is not None, sliced)
    leading = student_hidden.shape[:-1]
    teacher_vocab = check_linear_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, leading, device,
                                         autocast is not None, sliced)
    check_options(temperature, reduction, backend, ignore_index)
    check_labels(labels, leading, device, ignore_index, required=labels_required, what="the hidden states'")
    check_chunk_size(chunk_size)

    call = resolve(objective_name, labels=labels, leading=leading, n_rows=leading.numel(), device=device,
                   widths=(student_weight.shape[0], teacher_vocab),
                   names=("student_weight", "teacher_logits" if teacher_logits is not None else "teacher_weight"),
                   temperature=temperature, ignore_index=ignore_index, reduction=reduction, backend=backend,
                   num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
                   **options)
    if chunk_size is None:
        itemsize = student_hidden.element_size() if autocast is None else torch.finfo(autocast).bits // 8
        chunk_size = rows_per_chunk(leading.numel(), student_weight.shape[0], teacher_vocab, itemsize, device)
    chunk_size = call.agree_chunk_size(max(chunk_size, 1))

    def gemm_operand(tensor, detach=True):
        # Autocast's rule for a linear layer: both GEMM operands (and the bias) in its dtype; the
        # cast is differentiable, so each gradient returns in its input's own dtype.
        if tensor is None:
            return None
        tensor = tensor.detach() if detach else tensor
        return tensor if autocast is None else tensor.to(autocast)

    def flat_operand(tensor, detach=True):  # [..., H] -> [N, H]
        return None if tensor is None else gemm_operand(tensor.reshape(-1, tensor.shape[-1]), detach)

    inputs = LinearInputs(flat_operand(student_hidden, detach=False), gemm_operand(student_weight, detach=False),
                          gemm_operand(student_bias, detach=False), flat_operand(teacher_hidden),
                          gemm_operand(teacher_weight),
                          gemm_operand(teacher_bias),
                          None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach())
    # Inside, every op runs in the dtypes just chosen (autocast would recast the chunk GEMMs).
    with torch.autocast(device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
        return call, call.linear(inputs, chunk_size)


def fused_linear_divergence_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                                 *, divergence="forward_kl", beta=0.5, alpha=0.1, student_bias=None,
                                 teacher_bias=None, teacher_logits=None, temperature=1.0, ignore_index=-100,
                                 reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                 process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                 return_entropy=False):
    """A full-vocabulary divergence (`forward_kl`, `reverse_kl`, `jsd`, `skew_forward_kl`,
    `skew_reverse_kl`, `tvd`) from hidden states: `logits = hidden @ weight.T + bias`, chunked.
    `num_items_in_batch`, `process_group`, `vocab_offset`: as in `hybrid_kl_loss` (with a
    group, the weights and bias are this rank's vocabulary slice); `ce_weight`, `return_parts`:
    the hard-label term, and the logit scales, soft caps and `return_entropy`, as in
    `divergence_loss` (applied to each chunk's logits inside the kernels' passes)."""
    check_divergence(divergence)
    check_fraction("beta", beta)
    check_fraction("alpha", alpha)
    check_num_items(num_items_in_batch, reduction)
    check_ce_weight(ce_weight)
    call, result = _run(
        divergence, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_logits, labels, labels_required=False, temperature=temperature, ignore_index=ignore_index,
        reduction=reduction, chunk_size=chunk_size, backend=backend, num_items_in_batch=num_items_in_batch,
        process_group=process_group, vocab_offset=vocab_offset, beta=beta, alpha=alpha, ce_weight=ce_weight,
        return_parts=return_parts,
        logit_maps=check_logit_maps(student_logit_scale, teacher_logit_scale, student_softcap,
                                    teacher_softcap),
        return_entropy=check_flag("return_entropy", return_entropy))
    return call.outputs(*result)


def fused_linear_hybrid_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                                *, student_bias=None, teacher_bias=None, teacher_logits=None, sampled_ids=None,
                                seed=None, fkl_weight=1.0, rkl_weight=1.0, temperature=1.0, ignore_index=-100,
                                reduction="mean", chunk_size=None, backend="auto", return_details=False,
                                num_items_in_batch=None, process_group=None, vocab_offset=None, ce_weight=0.0,
                                return_parts=False,
                                student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                return_entropy=False):
    """HPD from hidden states and lm_head weights (see `hybrid_kl_loss`); `y_hat` is drawn in the
    kernel per chunk with the noise of each row's global index, so chunking never changes it."""
    check_num_items(num_items_in_batch, reduction)
    check_hpd_options(fkl_weight, rkl_weight, seed)
    check_ce_weight(ce_weight)
    call, result = _run(
        HPD, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        teacher_logits, labels, labels_required=True, temperature=temperature, ignore_index=ignore_index,
        reduction=reduction, chunk_size=chunk_size, backend=backend, num_items_in_batch=num_items_in_batch,
        process_group=process_group, vocab_offset=vocab_offset, sampled_ids=sampled_ids, seed=seed,
        fkl_weight=fkl_weight, rkl_weight=rkl_weight, ce_weight=ce_weight, return_parts=return_parts,
        logit_maps=check_logit_maps(student_logit_scale, teacher_logit_scale, student_softcap,
                                    teacher_softcap),
        return_entropy=check_flag("return_entropy", return_entropy))
    return call.outputs(*result, return_details=return_details)


# One function per divergence, with its own signature (so `help()` shows every argument).

def fused_linear_forward_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                                 student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                                 ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                 process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                 return_entropy=False):
    """Forward KL(p || q) from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="forward_kl",
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def fused_linear_reverse_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                                 student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                                 ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                 process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                 return_entropy=False):
    """Reverse KL(q || p) from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="reverse_kl",
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def fused_linear_jsd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                          beta=0.5, student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                          ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                          process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                          student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                          return_entropy=False):
    """Generalized JSD with mixture weight `beta` from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="jsd", beta=beta,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def fused_linear_skew_forward_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                                      alpha=0.1, student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                                      ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                      process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                                      student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                      return_entropy=False):
    """Skew forward KL with mixture weight `alpha` from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="skew_forward_kl", alpha=alpha,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def fused_linear_skew_reverse_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                                      alpha=0.1, student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                                      ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                      process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                                      student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                                      return_entropy=False):
    """Skew reverse KL with mixture weight `alpha` from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="skew_reverse_kl", alpha=alpha,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)


def fused_linear_tvd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                          student_bias=None, teacher_bias=None, teacher_logits=None, temperature=1.0,
                          ignore_index=-100, reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                          process_group=None, vocab_offset=None, ce_weight=0.0, return_parts=False,
                          student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
                          return_entropy=False):
    """Total variation distance from hidden states (see `fused_linear_divergence_loss`)."""
    return fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="tvd",
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
        num_items_in_batch=num_items_in_batch, process_group=process_group, vocab_offset=vocab_offset,
        ce_weight=ce_weight, return_parts=return_parts,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, return_entropy=return_entropy)
