"""Fused-linear losses: pass hidden states and lm_head weights; the logits exist one chunk at a time.

`fused_linear_hybrid_kl_loss` and `fused_linear_divergence_loss(divergence=...)` (with named
shortcuts) validate their arguments and hand over to `ops.fused_linear`, which reuses the very
kernels of the logits-level losses. The teacher is given as hidden states + weight (+ bias), or as
precomputed `teacher_logits`. Gradients flow to the student's hidden states, weight and bias.
"""

from __future__ import annotations

import torch

from .losses import (
    FLOATING,
    _check_fraction,
    _check_hpd_options,
    _check_labels,
    _check_options,
    _check_num_items,
    _check_sampled_ids,
    _details,
    _draw_seed,
    _parallel,
    _per_item,
    _shared_seed,
    _use_triton,
)
from .ops import divergence as triton_divergence
from .ops import hybrid as triton_hybrid
from .ops import custom_ops, torch_backend
from .ops.common import active_rows
from .ops.divergence import DIVERGENCE_CODES, mixture_logs
from .ops.fused_linear import FusedLinearDistillation, Objective, rows_per_chunk


def _check_tensor(name, tensor, dims=None):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if dims is not None and tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")


def _check_linear(prefix, hidden, weight, bias, device):
    _check_tensor(f"{prefix}_hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}_hidden must have shape [..., hidden_size], got {tuple(hidden.shape)}")
    _check_tensor(f"{prefix}_weight", weight, dims=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must have shape [vocab, {hidden.shape[-1]}] (hidden size of "
                         f"{prefix}_hidden), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight must have a vocabulary of at least 1 row, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight ({weight.dtype}) and {prefix}_hidden ({hidden.dtype}) must share a dtype")
    if bias is not None:
        _check_tensor(f"{prefix}_bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"{prefix}_bias must have shape [{weight.shape[0]}] and dtype {weight.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    for name, tensor in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight), (f"{prefix}_bias", bias)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {device}")


def _prepare(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
             teacher_logits, labels, *, labels_required, temperature, ignore_index, reduction, chunk_size, backend):
    """Validate, flatten to rows; returns the Function's tensor inputs and the shared vocabulary."""
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    _check_linear("student", student_hidden, student_weight, student_bias, device)
    leading = student_hidden.shape[:-1]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher either as teacher_logits or as teacher_hidden + teacher_weight, not both")
        _check_tensor("teacher_logits", teacher_logits)
        if teacher_logits.shape[:-1] != leading or teacher_logits.shape[-1] == 0:
            raise ValueError(f"teacher_logits must have shape {tuple(leading)} + [vocab], got {tuple(teacher_logits.shape)}")
        if teacher_logits.device != device:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on {device}")
        teacher_vocab = teacher_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is required: teacher_hidden and teacher_weight, or teacher_logits")
        _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
        if teacher_hidden.shape[:-1] != leading:
            raise ValueError(f"teacher_hidden must share the leading dimensions of student_hidden {tuple(leading)}, "
                             f"got {tuple(teacher_hidden.shape)}")
        teacher_vocab = teacher_weight.shape[0]
    if labels is None:
        if labels_required:
            raise ValueError("labels are required: a tensor of token ids shaped like the hidden states' leading dimensions")
    else:
        _check_labels(labels, leading, device, ignore_index)
    _check_options(temperature, reduction, backend)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (chosen from a memory budget), got {chunk_size!r}")

    rows = lambda tensor: None if tensor is None else tensor.reshape(-1, tensor.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    n_rows = leading.numel()
    if chunk_size is None:
        chunk_size = rows_per_chunk(n_rows, student_weight.shape[0], teacher_vocab, student_hidden.element_size(), device)
    tensors = (rows(student_hidden), student_weight, student_bias,
               None if teacher_hidden is None else rows(teacher_hidden).detach(),
               None if teacher_weight is None else teacher_weight.detach(),
               None if teacher_bias is None else teacher_bias.detach(),
               None if teacher_logits is None else rows(teacher_logits).detach(), flat_labels)
    return tensors, min(student_weight.shape[0], teacher_vocab), max(chunk_size, 1)


def _parallel_setup(process_group, vocab_offset, student_weight, teacher_weight, teacher_logits, backend, chunk_size):
    """The vocabulary-parallel implementation (or None) and a chunk size every rank agrees on (the
    collectives run once per chunk, so every rank must cut the rows alike)."""
    teacher_side = teacher_logits if teacher_logits is not None else teacher_weight.t()
    names = ("student_weight", "teacher_logits" if teacher_logits is not None else "teacher_weight")
    parallel = _parallel(process_group, vocab_offset, student_weight.t(), teacher_side, backend, names)
    if parallel is not None:
        import torch.distributed as dist

        agreed = torch.tensor(chunk_size, dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=process_group)
        chunk_size = int(agreed)
    return parallel, chunk_size


def _active(tensors, vocab, ignore_index):
    """Rows in the loss: labelled with a token of `vocab` (the labels' vocabulary: the whole one
    across slices), or every row without labels."""
    hidden, labels = tensors[0], tensors[-1]
    return active_rows(labels, hidden.shape[0], vocab, ignore_index, hidden.device)


def _compiled_call(tensors, sampled_ids, active, objective, reduction, chunk_size, use_triton):
    """The fused-linear loss through its custom op (under torch.compile): `(loss, drawn, w_y, w_hat)`."""
    if reduction == "none":
        raise ValueError("under torch.compile the fused-linear losses support reduction='mean' or 'sum'")
    student_hidden, student_weight, student_bias = tensors[:3]
    outputs = custom_ops.fused_linear(
        *tensors, sampled_ids, active, objective.name, objective.temperature, objective.ignore_index, objective.log_mix_p,
        objective.log_mix_q, objective.seed, objective.fkl_weight, objective.rkl_weight, reduction, chunk_size,
        "triton" if use_triton else "torch", student_hidden.requires_grad, student_weight.requires_grad,
        student_bias is not None and student_bias.requires_grad)
    return outputs[:4]


def _finish(loss, reduction, num_items_in_batch, leading):
    if reduction == "none":
        return loss.reshape(leading)
    if num_items_in_batch is not None:  # computed as a sum; divided by the global count
        return _per_item(loss, num_items_in_batch)
    return loss


def fused_linear_divergence_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                                 *, divergence="forward_kl", beta=0.5, alpha=0.1, student_bias=None,
                                 teacher_bias=None, teacher_logits=None, temperature=1.0, ignore_index=-100,
                                 reduction="mean", chunk_size=None, backend="auto", num_items_in_batch=None,
                                 process_group=None, vocab_offset=None):
    """A full-vocabulary divergence (`forward_kl`, `reverse_kl`, `jsd`, `skew_forward_kl`,
    `skew_reverse_kl`, `tvd`) from hidden states: `logits = hidden @ weight.T + bias`, chunked.
    `num_items_in_batch`, `process_group`, `vocab_offset`: as in `hybrid_kl_loss` (with a
    group, the weights and bias are this rank's vocabulary slice)."""
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCE_CODES)}, got {divergence!r}")
    _check_fraction("beta", beta)
    _check_fraction("alpha", alpha)
    _check_num_items(num_items_in_batch, reduction)
    tensors, vocab, chunk_size = _prepare(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
        labels, labels_required=False, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend)
    parallel, chunk_size = _parallel_setup(process_group, vocab_offset, student_weight, teacher_weight,
                                           teacher_logits, backend, chunk_size)
    active = _active(tensors, parallel.global_vocab if parallel is not None else vocab, ignore_index)
    name, log_mix_p, log_mix_q = mixture_logs(divergence, beta, alpha)
    objective = Objective(name, float(temperature), int(ignore_index), log_mix_p, log_mix_q)
    use_triton = _use_triton(backend, student_hidden.device)
    impl = parallel or (triton_divergence if use_triton else torch_backend)
    inner = "sum" if num_items_in_batch is not None else reduction
    if torch.compiler.is_compiling():
        loss, *_ = _compiled_call(tensors, None, active, objective, inner, chunk_size, use_triton)
    else:
        loss, *_ = FusedLinearDistillation.apply(*tensors, None, active, objective, inner, chunk_size, impl)
    return _finish(loss, reduction, num_items_in_batch, student_hidden.shape[:-1])


def fused_linear_hybrid_kl_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                                *, student_bias=None, teacher_bias=None, teacher_logits=None, sampled_ids=None,
                                seed=None, fkl_weight=1.0, rkl_weight=1.0, temperature=1.0, ignore_index=-100,
                                reduction="mean", chunk_size=None, backend="auto", return_details=False,
                                num_items_in_batch=None, process_group=None, vocab_offset=None):
    """HPD from hidden states and lm_head weights (see `hybrid_kl_loss`); `y_hat` is drawn in the
    kernel per chunk with the noise of each row's global index, so chunking never changes it."""
    _check_num_items(num_items_in_batch, reduction)
    tensors, vocab, chunk_size = _prepare(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
        labels, labels_required=True, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend)
    _check_hpd_options(fkl_weight, rkl_weight, seed)
    parallel, chunk_size = _parallel_setup(process_group, vocab_offset, student_weight, teacher_weight,
                                           teacher_logits, backend, chunk_size)
    if parallel is not None:
        vocab = parallel.global_vocab
    flat_labels = tensors[-1]
    active = _active(tensors, vocab, ignore_index)
    leading = student_hidden.shape[:-1]
    if sampled_ids is not None:
        sampled_ids = _check_sampled_ids(sampled_ids, leading, active, vocab)
    elif seed is None:
        seed = _shared_seed(_draw_seed() if process_group is None else None, process_group)
    objective = Objective("hpd", float(temperature), int(ignore_index), seed=seed or 0,
                          fkl_weight=float(fkl_weight), rkl_weight=float(rkl_weight))
    use_triton = _use_triton(backend, student_hidden.device)
    impl = parallel or (triton_hybrid if use_triton else torch_backend)
    inner = "sum" if num_items_in_batch is not None else reduction
    if torch.compiler.is_compiling():
        loss, drawn, w_label, w_sample = _compiled_call(tensors, sampled_ids, active, objective, inner, chunk_size,
                                                        use_triton)
    else:
        loss, drawn, w_label, w_sample = FusedLinearDistillation.apply(
            *tensors, sampled_ids, active, objective, inner, chunk_size, impl)
    loss = _finish(loss, reduction, num_items_in_batch, leading)
    if not return_details:
        return loss
    return loss, _details(drawn, w_label, w_sample, flat_labels, active, leading)


def _shortcut(divergence, doc):
    def loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, **kwargs):
        return fused_linear_divergence_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                            divergence=divergence, **kwargs)

    loss.__name__ = loss.__qualname__ = f"fused_linear_{divergence}_loss"
    loss.__doc__ = f"{doc} from hidden states; keyword arguments as `fused_linear_divergence_loss`."
    return loss


fused_linear_forward_kl_loss = _shortcut("forward_kl", "Forward KL(p || q)")
fused_linear_reverse_kl_loss = _shortcut("reverse_kl", "Reverse KL(q || p)")
fused_linear_jsd_loss = _shortcut("jsd", "Generalized JSD (beta=...)")
fused_linear_skew_forward_kl_loss = _shortcut("skew_forward_kl", "Skew forward KL (alpha=...)")
fused_linear_skew_reverse_kl_loss = _shortcut("skew_reverse_kl", "Skew reverse KL (alpha=...)")
fused_linear_tvd_loss = _shortcut("tvd", "Total variation distance")
