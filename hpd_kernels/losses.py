"""The public loss functions: validate the arguments, flatten to rows, pick a backend, reduce.

All the arithmetic lives in `ops/` (Triton kernels and their torch twin); this module only refuses
bad input before anything runs and turns per-row losses into the requested reduction.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .ops import divergence as triton_divergence
from .ops import hybrid as triton_hybrid
from .ops import custom_ops, torch_backend
from .ops.common import STAT_W_LABEL, STAT_W_SAMPLE, active_rows
from .ops.divergence import DivergenceFunction, mixture_logs
from .ops.hybrid import HybridFunction
from .ops.triton_utils import HAS_TRITON, interpreter_enabled, triton_usable_on

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


# ----------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was expected.
# ----------------------------------------------------------------------------------------------

def _check_logits(name, logits):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., vocab], got {type(logits).__name__}")
    if logits.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., vocab] with vocab >= 1, got {tuple(logits.shape)}")


def _check_ids(name, ids, leading_shape, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (e.g. torch.long), got {ids.dtype}")
    if tuple(ids.shape) != tuple(leading_shape):
        raise ValueError(f"{name} must have shape {tuple(leading_shape)} (the logits' leading dimensions), "
                         f"got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but student_logits is on {device}; put them on one device")


def _validate(student_logits, teacher_logits, labels, *, temperature, reduction, backend, ignore_index,
              labels_required):
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits and teacher_logits must share their leading dimensions, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    device = student_logits.device
    if teacher_logits.device != device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on {device}")
    if labels is None:
        if labels_required:
            raise ValueError("labels are required: a tensor of token ids shaped like the logits' leading dimensions")
    else:
        _check_labels(labels, student_logits.shape[:-1], device, ignore_index)
    _check_options(temperature, reduction, backend)


def _check_options(temperature, reduction, backend):
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _compiling():
    return torch.compiler.is_compiling()


def _check_labels(labels, leading_shape, device, ignore_index):
    _check_ids("labels", labels, leading_shape, device)
    # Value checks read the tensor (a sync, and a graph break under torch.compile): eager only.
    if not _compiling() and labels.numel() and bool(((labels < 0) & (labels != ignore_index)).any()):
        raise ValueError(f"labels must be token ids >= 0 or ignore_index ({ignore_index}); found other negative values")


def _check_hpd_options(fkl_weight, rkl_weight, seed):
    for name, value in (("fkl_weight", fkl_weight), ("rkl_weight", rkl_weight)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


def _check_sampled_ids(sampled_ids, leading_shape, active, vocab):
    """Flattened int64 sampled ids, each active row's within [0, vocab)."""
    _check_ids("sampled_ids", sampled_ids, leading_shape, active.device)
    sampled_ids = sampled_ids.reshape(-1).to(torch.int64).contiguous()
    if not _compiling() and bool((active & ((sampled_ids < 0) | (sampled_ids >= vocab))).any()):
        raise ValueError(f"sampled_ids must lie in [0, {vocab}) (the shared vocabulary) on every active row")
    return sampled_ids


def _draw_seed():
    # Drawn from torch's generator, so torch.manual_seed makes the whole call reproducible.
    if _compiling():
        raise ValueError("under torch.compile, pass seed= (or sampled_ids=) to HPD: drawing a seed would "
                         "read a tensor inside the graph")
    return int(torch.randint(0, 2**62, (1,)).item())


def _check_fraction(name, value):
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _use_triton(backend, device) -> bool:
    """'auto' takes Triton on CUDA and torch elsewhere; 'triton' where it cannot run is an error."""
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; use backend='torch'")
    if not triton_usable_on(device):
        hint = ("set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU "
                "through Triton's interpreter" if device.type == "cpu" and not interpreter_enabled() else
                "Triton kernels run on CUDA devices")
        raise RuntimeError(f"backend='triton' cannot run on {device}: {hint}; or use backend='torch'")
    return True


def _rows(logits):
    """Flatten `[..., V]` to `[N, V]` keeping a row stride when possible; the last dim must be unit-stride."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _check_num_items(num_items_in_batch, reduction):
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss, so it needs reduction='mean', "
                         f"got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype.is_complex:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
    elif not isinstance(num_items_in_batch, (int, float)) or not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0 (the active tokens of the global batch), "
                         f"got {num_items_in_batch!r}")


def _reduce(per_row, active, reduction, leading_shape, num_items_in_batch=None):
    """`"mean"` is over this call's active rows, or over `num_items_in_batch` when given: the active
    tokens of the whole global batch (every rank, every accumulation step), so that per-call losses
    summed over ranks and micro-batches give the global token mean."""
    if reduction == "none":
        return per_row.reshape(leading_shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return _per_item(total, num_items_in_batch)
    return total / active.sum().clamp(min=1).to(total.dtype)


def _per_item(total, num_items_in_batch):
    """A summed loss over the global batch's active tokens (`num_items_in_batch`)."""
    return total / torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype)


def _parallel(process_group, vocab_offset, student_logits, teacher_logits, backend, names=("student_logits",
                                                                                          "teacher_logits")):
    """The vocabulary-parallel implementation for this rank's slice, or None without a group."""
    if process_group is not None and _compiling():
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
    student_width, teacher_width = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_width != teacher_width:
        raise ValueError(f"with process_group, {names[0]} and {names[1]} must hold the same vocabulary slice; "
                         f"got widths {student_width} and {teacher_width}")
    offset, global_vocab = slice_layout(process_group, student_width, vocab_offset)
    return VocabParallel(process_group, offset, global_vocab)


def _label_vocab(parallel, student, teacher):
    """The vocabulary the labels index: the whole one across slices, else the shared one."""
    return parallel.global_vocab if parallel is not None else min(student.shape[-1], teacher.shape[-1])


def _shared_seed(seed, process_group):
    """One seed for every rank of the group (rank 0's draw when none was given)."""
    if seed is not None or process_group is None:
        return seed
    import torch.distributed as dist

    drawn = torch.tensor([_draw_seed()], dtype=torch.int64)
    dist.broadcast(drawn, src=dist.get_global_rank(process_group, 0), group=process_group)
    return int(drawn.item())


# ----------------------------------------------------------------------------------------------
# Full-vocabulary divergences.
# ----------------------------------------------------------------------------------------------

def _divergence_loss(divergence, student_logits, teacher_logits, labels, *, temperature, ignore_index,
                     reduction, backend, beta=0.5, alpha=0.1, num_items_in_batch=None, process_group=None,
                     vocab_offset=None):
    _validate(student_logits, teacher_logits, labels, temperature=temperature, reduction=reduction,
              backend=backend, ignore_index=ignore_index, labels_required=False)
    _check_num_items(num_items_in_batch, reduction)
    parallel = _parallel(process_group, vocab_offset, student_logits, teacher_logits, backend)
    if parallel is not None:
        impl = parallel
    else:
        impl = triton_divergence if _use_triton(backend, student_logits.device) else torch_backend
    divergence, log_mix_p, log_mix_q = mixture_logs(divergence, beta, alpha)
    student, teacher = _rows(student_logits), _rows(teacher_logits)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    active = active_rows(flat_labels, student.shape[0], _label_vocab(parallel, student, teacher), ignore_index,
                         student.device)
    if _compiling():  # the custom op: opaque to the compiler, same implementation
        per_row, _ = custom_ops.divergence_rows(student, teacher.detach(), flat_labels, active, divergence,
                                                float(temperature), log_mix_p, log_mix_q, int(ignore_index),
                                                "torch" if impl is torch_backend else "triton")
    else:
        per_row = DivergenceFunction.apply(student, teacher.detach(), flat_labels, active, divergence,
                                           float(temperature), log_mix_p, log_mix_q, int(ignore_index), impl)
    return _reduce(per_row, active, reduction, student_logits.shape[:-1], num_items_in_batch)


def forward_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
                    reduction="mean", backend="auto", num_items_in_batch=None,
                    process_group=None, vocab_offset=None):
    """KL(p || q), the mode-covering divergence. Gradient weights `w = p`."""
    return _divergence_loss("forward_kl", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset)


def reverse_kl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
                    reduction="mean", backend="auto", num_items_in_batch=None,
                    process_group=None, vocab_offset=None):
    """KL(q || p), the mode-seeking divergence. Weights `w = q (log p - log q)`."""
    return _divergence_loss("reverse_kl", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta=0 is forward KL, 1 reverse KL."""
    _check_fraction("beta", beta)
    return _divergence_loss("jsd", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset, beta=beta)


def skew_forward_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None):
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL)."""
    _check_fraction("alpha", alpha)
    return _divergence_loss("skew_forward_kl", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset, alpha=alpha)


def skew_reverse_kl_loss(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
                         ignore_index=-100, reduction="mean", backend="auto", num_items_in_batch=None,
                         process_group=None, vocab_offset=None):
    """KL(q || alpha q + (1 - alpha) p) (DistiLLM's skew reverse KL)."""
    _check_fraction("alpha", alpha)
    return _divergence_loss("skew_reverse_kl", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset, alpha=alpha)


def tvd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="mean", backend="auto", num_items_in_batch=None,
             process_group=None, vocab_offset=None):
    """Total variation distance 1/2 sum |p - q|."""
    return _divergence_loss("tvd", student_logits, teacher_logits, labels, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            num_items_in_batch=num_items_in_batch, process_group=process_group,
                            vocab_offset=vocab_offset)


# ----------------------------------------------------------------------------------------------
# Hybrid Policy Distillation.
# ----------------------------------------------------------------------------------------------

def _hybrid(student_logits, teacher_logits, labels, *, sampled_ids, seed, fkl_weight, rkl_weight, temperature,
            ignore_index, backend, process_group=None, vocab_offset=None):
    _validate(student_logits, teacher_logits, labels, temperature=temperature, reduction="none",
              backend=backend, ignore_index=ignore_index, labels_required=True)
    _check_hpd_options(fkl_weight, rkl_weight, seed)
    parallel = _parallel(process_group, vocab_offset, student_logits, teacher_logits, backend)
    if parallel is not None:
        impl = parallel
    else:
        impl = triton_hybrid if _use_triton(backend, student_logits.device) else torch_backend
    student, teacher = _rows(student_logits), _rows(teacher_logits)
    vocab = _label_vocab(parallel, student, teacher)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    active = active_rows(flat_labels, student.shape[0], vocab, ignore_index, student.device)
    if sampled_ids is not None:
        sampled_ids = _check_sampled_ids(sampled_ids, student_logits.shape[:-1], active, vocab)
    elif seed is None:
        seed = _shared_seed(_draw_seed() if process_group is None else None, process_group)
    if _compiling():
        per_row, stats, drawn = custom_ops.hybrid_rows(
            student, teacher.detach(), flat_labels, active, sampled_ids, int(seed or 0), float(temperature),
            float(fkl_weight), float(rkl_weight), int(ignore_index), "torch" if impl is torch_backend else "triton")
        w_label, w_sample = stats[:, STAT_W_LABEL].detach(), stats[:, STAT_W_SAMPLE].detach()
    else:
        per_row, drawn, w_label, w_sample = HybridFunction.apply(
            student, teacher.detach(), flat_labels, active, sampled_ids, seed, float(temperature),
            float(fkl_weight), float(rkl_weight), int(ignore_index), impl)
    return per_row, active, _details(drawn, w_label, w_sample, flat_labels, active, student_logits.shape[:-1])


def _details(drawn, w_label, w_sample, flat_labels, active, leading):
    mismatch = (active & (drawn != flat_labels)).sum().to(torch.float32) / active.sum().clamp(min=1)
    return HybridDetails(drawn.reshape(leading), w_label.reshape(leading), w_sample.reshape(leading), mismatch)


def hybrid_kl_loss(student_logits, teacher_logits, labels, *, sampled_ids=None, seed=None, fkl_weight=1.0,
                   rkl_weight=1.0, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
                   return_details=False, num_items_in_batch=None, process_group=None, vocab_offset=None):
    """Hybrid Policy Distillation loss (spec: forward-KL signal on `y`, reverse-KL signal on `y_hat ~ q`).

    `sampled_ids` gives `y_hat` (shape of `labels`); when None the kernel draws it by Gumbel-max,
    reproducibly from `seed` (or from torch's generator when `seed` is None as well).
    With `return_details=True` returns `(loss, HybridDetails)`.

    `num_items_in_batch` (with `reduction="mean"`) divides the summed loss by the active tokens of
    the global batch instead of this call's. `process_group` makes the call vocabulary-parallel:
    the logits are this rank's slice of the vocabulary, starting at `vocab_offset` (default: the
    widths of the lower ranks), and labels / `sampled_ids` are global ids.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_num_items(num_items_in_batch, reduction)
    per_row, active, details = _hybrid(
        student_logits, teacher_logits, labels, sampled_ids=sampled_ids, seed=seed, fkl_weight=fkl_weight,
        rkl_weight=rkl_weight, temperature=temperature, ignore_index=ignore_index, backend=backend,
        process_group=process_group, vocab_offset=vocab_offset)
    loss = _reduce(per_row, active, reduction, student_logits.shape[:-1], num_items_in_batch)
    return (loss, details) if return_details else loss


@torch.no_grad()
def hpd_token_weights(student_logits, teacher_logits, labels, *, sampled_ids=None, seed=None, fkl_weight=1.0,
                      rkl_weight=1.0, temperature=1.0, ignore_index=-100, backend="auto", process_group=None,
                      vocab_offset=None) -> HybridDetails:
    """HPD's per-row weights `(w_y, w_hat)` and samples `y_hat`, forward only (no graph is built)."""
    _, _, details = _hybrid(
        student_logits.detach(), teacher_logits, labels, sampled_ids=sampled_ids, seed=seed,
        fkl_weight=fkl_weight, rkl_weight=rkl_weight, temperature=temperature, ignore_index=ignore_index,
        backend=backend, process_group=process_group, vocab_offset=vocab_offset)
    return details


DIVERGENCES = {
    "forward_kl": forward_kl_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": generalized_jsd_loss,
    "skew_forward_kl": skew_forward_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
    "tvd": tvd_loss,
}
