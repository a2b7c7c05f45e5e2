"""The fused-linear weight-gradient GEMM on the CUDA path takes the chunk's bf16 operands as they are.

There is no GPU here, so the tests force the CUDA branch of the one rule (`half_operand_gemm`) and
run the chunk loop on CPU tensors under a `TorchDispatchMode` that records every aten op the Python
code issues, with its arguments and the tensors it creates (outputs sharing no storage with an
input). `aten.addmm.dtype_out` has no CPU kernel, so the mode computes it itself (operands upcast,
outside the record), as the aten semantics define it.

What this proves: on the CUDA branch the forward and backward issue no float32 copy of a chunk
(nor of the logits, nor of the hidden rows), dL/dW is one `addmm.dtype_out` per chunk with bf16
operands accumulating into the float32 [V, H] buffer, and backward creates no second float32
grad_W; and that branch's gradients equal the CPU fallback's. What it does not prove: what cuBLAS
does inside the GEMM, or the probe `_cuda_addmm_accumulates_in_float32` (both need a GPU).
"""

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hpd_kernels
from hpd_kernels.ops import chunked_linear as fused_linear_ops
from hpd_kernels.ops.backend_contract import DivergenceForward
from hpd_kernels.ops.chunked_linear import FusedLinearDistillation
from hpd_kernels.registry import Objective

aten = torch.ops.aten

# Sizes all distinct, so a tensor's shape says what it is: 20 rows in chunks of 8, 8 and 4.
N_ROWS, CHUNK, VOCAB, HIDDEN, TEACHER_VOCAB, TEACHER_HIDDEN = 20, 8, 40, 16, 48, 12


@dataclass
class Call:
    op: torch._ops.OpOverload
    args: dict          # the schema's argument names -> values
    created: list       # (dtype, shape) of each output that is a new tensor, not a view or an `out=`


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = dict(zip((argument.name for argument in func._schema.arguments), args), **kwargs)
        if func is aten.addmm.dtype_out:  # `out = beta * self + alpha * mat1 @ mat2`, in `out_dtype`
            dtype = bound["out_dtype"]
            result = torch.addmm(bound["self"].to(dtype), bound["mat1"].to(dtype), bound["mat2"].to(dtype),
                                 beta=bound.get("beta", 1), alpha=bound.get("alpha", 1), out=bound["out"])
        else:
            result = func(*args, **kwargs)
        storages = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        created = [(t.dtype, tuple(t.shape)) for t in tree_leaves(result)
                   if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages]
        self.calls.append(Call(func, bound, created))
        return result


class LossStub:
    """Stands in for the loss kernels, which on CUDA are Triton kernels reading the bf16 logits in
    place (the torch backend upcasts its own sub-chunks by design): per-row values, and a gradient
    written over the logits in place. The ops recorded are then the chunk loop's own."""

    @staticmethod
    def divergence_forward(student, teacher, labels, **_):
        rows = student.shape[0]
        return DivergenceForward(student.new_zeros(rows, dtype=torch.float32),
                                 student.new_zeros(rows, 3, dtype=torch.float32))

    @staticmethod
    def divergence_backward(student, teacher, stats, row_scale, grad, **_):
        return grad.mul_(0.5)

    @staticmethod
    def reduce_hidden_grad(grad_hidden):  # the whole vocabulary, as ops.backend_contract.Backend asks
        return grad_hidden


def _problem(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    return dict(student_hidden=randn(N_ROWS, HIDDEN), student_weight=randn(VOCAB, HIDDEN) / 4,
                student_bias=randn(VOCAB), teacher_hidden=randn(N_ROWS, TEACHER_HIDDEN),
                teacher_weight=randn(TEACHER_VOCAB, TEACHER_HIDDEN) / 4)


@pytest.fixture
def cuda_path(monkeypatch):
    monkeypatch.setattr(fused_linear_ops, "half_operand_gemm", lambda device, dtype: True)


def test_the_rule_upcasts_off_cuda_and_never_for_full_precision():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert not fused_linear_ops.half_operand_gemm(torch.device("cpu"), dtype)
    for dtype in (torch.float32, torch.float64):  # decided without asking CUDA
        assert not fused_linear_ops.half_operand_gemm(torch.device("cuda"), dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in the forward / rebuilt in backward
def test_cuda_path_issues_no_float32_copy_of_a_chunk(cuda_path, reduction):
    problem = {name: tensor.requires_grad_(name.startswith("student")) for name, tensor in _problem().items()}
    params = [problem[name] for name in ("student_hidden", "student_weight", "student_bias")]
    active = torch.ones(N_ROWS, dtype=torch.bool)
    with RecordOps() as record:
        loss, *_ = FusedLinearDistillation.apply(
            active, Objective("forward_kl", 1.0, -100), reduction, CHUNK, LossStub,
            *params, problem["teacher_hidden"], problem["teacher_weight"])
        torch.autograd.grad(loss.sum(), params)

    model_dims = {VOCAB, HIDDEN, TEACHER_VOCAB, TEACHER_HIDDEN}
    float32_created = [shape for call in record.calls for dtype, shape in call.created
                       if dtype == torch.float32 and model_dims & set(shape)]
    grad_bias_sums = [(VOCAB,)] * 3  # `sum(0, dtype=float32)` of each chunk's bf16 gradient (CUDA reads it as is)
    assert float32_created == [(VOCAB, HIDDEN), (VOCAB,)] + grad_bias_sums  # the accumulators: grad_W, grad_b

    gemms = [call for call in record.calls if call.op is aten.addmm.dtype_out]
    assert [(call.args["mat1"].shape, call.args["mat2"].shape) for call in gemms] == [
        ((VOCAB, rows), (rows, HIDDEN)) for rows in (CHUNK, CHUNK, N_ROWS - 2 * CHUNK)]
    accumulator = gemms[0].args["out"]
    for call in gemms:
        assert call.args["mat1"].dtype == call.args["mat2"].dtype == torch.bfloat16
        assert call.args["out"] is accumulator and call.args["self"] is accumulator
        assert accumulator.dtype == torch.float32 and call.args["out_dtype"] == torch.float32
    operand_names = {aten.mm: ("self", "mat2"), aten.addmm: ("mat1", "mat2"), aten.addmm_: ("mat1", "mat2")}
    operands = [call.args[name] for call in record.calls if call.op.overloadpacket in operand_names
                for name in operand_names[call.op.overloadpacket]]
    assert operands and all(operand.dtype == torch.bfloat16 for operand in operands)  # every GEMM of the step


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_path_gradients_equal_the_fallback(monkeypatch, reduction):
    def grads():
        problem = {name: tensor.requires_grad_(name.startswith("student")) for name, tensor in _problem().items()}
        params = [problem[name] for name in ("student_hidden", "student_weight", "student_bias")]
        loss = hpd_kernels.fused_linear_forward_kl_loss(
            params[0], params[1], problem["teacher_hidden"], problem["teacher_weight"],
            student_bias=params[2], reduction=reduction, chunk_size=CHUNK, backend="torch")
        weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        return loss, torch.autograd.grad((loss * weights).sum(), params)

    fallback_loss, fallback_grads = grads()
    monkeypatch.setattr(fused_linear_ops, "half_operand_gemm", lambda device, dtype: True)
    with RecordOps() as record:
        loss, cuda_grads = grads()
    assert any(call.op is aten.addmm.dtype_out for call in record.calls)
    assert torch.equal(loss, fallback_loss)
    for cuda_grad, fallback_grad in zip(cuda_grads, fallback_grads):
        assert cuda_grad.dtype == torch.bfloat16 and torch.equal(cuda_grad, fallback_grad)
