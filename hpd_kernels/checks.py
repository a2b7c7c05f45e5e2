"""Argument checks of the public losses, run before anything is computed. Every message names the
argument and what was expected. Both loss families (`losses`, `fused_linear`) use these and nothing
else; what a check needs to know about the objectives comes from `registry`."""

from __future__ import annotations

import math
import numbers

import torch

from .ops.backends import CHOICES as BACKENDS
from .registry import DIVERGENCES, LogitMaps

REDUCTIONS = ("mean", "sum", "none")
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compiling() -> bool:
    return torch.compiler.is_compiling()


def is_real(value) -> bool:
    """A real number (Python's, NumPy's, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An integer (Python's, NumPy's, ...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_floating(name, tensor, dims=None):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if dims is not None and tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")


def check_logits(name, logits, sliced=False):
    """Floating logits `[..., vocab]`, vocab >= 1 unless `sliced` (a vocabulary-parallel slice, whose
    width every rank checks together: `ops.vocab_parallel.slice_layout`)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., vocab], got {type(logits).__name__}")
    check_floating(name, logits)
    if logits.dim() < 1 or (logits.shape[-1] == 0 and not sliced):
        raise ValueError(f"{name} must have shape [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")


def check_logit_pair(student_logits, teacher_logits, sliced=False):
    check_logits("student_logits", student_logits, sliced)
    check_logits("teacher_logits", teacher_logits, sliced)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must share their leading dimensions, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on "
                         f"{student_logits.device}")


def check_linear(prefix, hidden, weight, bias, device, autocast=False, sliced=False):
    """`{prefix}_hidden [..., H]`, `{prefix}_weight [V, H]` and an optional `{prefix}_bias [V]` on `device`,
    of one dtype unless `autocast` will cast them to its own; V >= 1 unless `sliced` (`check_logits`)."""
    check_floating(f"{prefix}_hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}_hidden must have shape [..., hidden_size], got {tuple(hidden.shape)}")
    check_floating(f"{prefix}_weight", weight, dims=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must have shape [vocab, {hidden.shape[-1]}] (hidden size of "
                         f"{prefix}_hidden), got {tuple(weight.shape)}")
    if weight.shape[0] == 0 and not sliced:
        raise ValueError(f"{prefix}_weight must have a vocabulary of at least 1 row, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype and not autocast:
        raise TypeError(f"{prefix}_weight ({weight.dtype}) and {prefix}_hidden ({hidden.dtype}) must share a dtype "
                        f"(or run under torch.autocast, which computes both in its dtype)")
    if bias is not None:
        check_floating(f"{prefix}_bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0] or (bias.dtype != weight.dtype and not autocast):
            raise ValueError(f"{prefix}_bias must have shape [{weight.shape[0]}] and dtype {weight.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    for name, tensor in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {device}")


def check_linear_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, leading, device,
                         autocast=False, sliced=False):
    """The teacher of a fused-linear loss, as logits or as hidden states + weight; returns its vocabulary
    (>= 1 unless `sliced`: `check_logits`)."""
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight, not both")
        check_floating("teacher_logits", teacher_logits)
        if teacher_logits.shape[:-1] != leading or (teacher_logits.shape[-1] == 0 and not sliced):
            raise ValueError(f"teacher_logits must have shape {tuple(leading)} + [vocab], got "
                             f"{tuple(teacher_logits.shape)}")
        if teacher_logits.device != device:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on {device}")
        return teacher_logits.shape[-1]
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("the teacher is required: teacher_hidden and teacher_weight, or teacher_logits")
    check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, device, autocast, sliced)
    if teacher_hidden.shape[:-1] != leading:
        raise ValueError(f"teacher_hidden must share the leading dimensions of student_hidden {tuple(leading)}, "
                         f"got {tuple(teacher_hidden.shape)}")
    return teacher_weight.shape[0]


def check_ids(name, ids, leading_shape, device, device_of="student_logits"):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {ids.dtype}")
    if tuple(ids.shape) != tuple(leading_shape):
        raise ValueError(f"{name} must have shape {tuple(leading_shape)} (the logits' leading dimensions), "
                         f"got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but {device_of} is on {device}; put them on one device")


def check_labels(labels, leading_shape, device, ignore_index, *, required, what="the logits'"):
    if labels is None:
        if required:
            raise ValueError(f"labels are required: a tensor of token ids shaped like {what} leading dimensions")
        return
    check_ids("labels", labels, leading_shape, device)
    # Value checks read the tensor (a sync, and a graph break under torch.compile): eager only.
    if not compiling() and labels.numel() and bool(((labels < 0) & (labels != ignore_index)).any()):
        raise ValueError(f"labels must be token ids >= 0 or ignore_index ({ignore_index}); found other negative values")


def check_options(temperature, reduction, backend, ignore_index):
    if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not is_integer(ignore_index):
        raise TypeError(f"ignore_index must be an int (the label of rows not in the loss), got {ignore_index!r}")
    check_reduction(reduction)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Peers' reductions, with how to get the same number here.
PEER_REDUCTIONS = {
    "batchmean": "TRL's 'batchmean' (its generalized_jsd_loss) is the mean over the active tokens: "
                 "reduction='mean'; torch.nn.KLDivLoss's 'batchmean' (sum / batch size) is reduction='sum' "
                 "divided by the batch size",
    "elementwise": "the losses never hold [tokens, vocab] terms; reduction='none' gives one value per token "
                   "(hpd_kernels.reference computes element-wise terms)",
}


def check_reduction(reduction):
    if reduction in PEER_REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}: {PEER_REDUCTIONS[reduction]}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_divergence(divergence):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def check_fraction(name, value):
    if not is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_hpd_options(fkl_weight, rkl_weight, seed):
    for name, value in (("fkl_weight", fkl_weight), ("rkl_weight", rkl_weight)):
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if seed is not None and not is_integer(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


def check_logit_maps(student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap) -> LogitMaps:
    """The `LogitMaps` of the public keywords: scales positive finite numbers, caps None (no cap) or
    positive finite numbers."""
    for name, value in (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale)):
        if not is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (the logits' multiplier), got {value!r}")
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None and (not is_real(value) or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be None (no soft cap) or a finite number > 0 (softcap * tanh(z / "
                             f"softcap)), got {value!r}")
    return LogitMaps(float(student_logit_scale), float(student_softcap or 0.0), float(teacher_logit_scale),
                     float(teacher_softcap or 0.0))


def check_flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_ce_weight(ce_weight):
    if not is_real(ce_weight) or not math.isfinite(ce_weight) or ce_weight < 0:
        raise ValueError(f"ce_weight must be a finite number >= 0 (the hard-label term's weight), got {ce_weight!r}")


def check_chunk_size(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (chosen from a memory budget), got {chunk_size!r}")


def check_num_items(num_items_in_batch, reduction):
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss, so it needs reduction='mean', "
                         f"got reduction={reduction!r}")
    expected = "num_items_in_batch must be > 0 and finite (the active tokens of the global batch)"
    if isinstance(num_items_in_batch, torch.Tensor):
        if (num_items_in_batch.numel() != 1 or num_items_in_batch.dtype.is_complex
                or num_items_in_batch.dtype == torch.bool):
            raise ValueError(f"num_items_in_batch must be a number or a one-element real tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)} {num_items_in_batch.dtype}")
        if compiling():
            return
        count = num_items_in_batch.reshape(())
        valid = torch.isfinite(count) & (count > 0)
        if num_items_in_batch.device.type == "cpu":
            if not bool(valid):
                raise ValueError(f"{expected}, got {num_items_in_batch.item()!r}")
        else:  # checked on the device: no host synchronisation in a training step
            torch._assert_async(valid, expected)
    elif not is_real(num_items_in_batch) or not (math.isfinite(num_items_in_batch) and num_items_in_batch > 0):
        raise ValueError(f"{expected}, got {num_items_in_batch!r}")


def check_sampled_ids(sampled_ids, leading_shape, active, vocab):
    """Flattened int64 sampled ids, each active row's within [0, vocab)."""
    check_ids("sampled_ids", sampled_ids, leading_shape, active.device)
    sampled_ids = sampled_ids.reshape(-1).to(torch.int64).contiguous()
    if not compiling() and bool((active & ((sampled_ids < 0) | (sampled_ids >= vocab))).any()):
        raise ValueError(f"sampled_ids must lie in [0, {vocab}) (the shared vocabulary) on every active row")
    return sampled_ids
