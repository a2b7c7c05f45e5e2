"""Both backends against `reference/`, in float64 and from float32 / bfloat16 inputs, for every
objective: loss values under every reduction and gradients with respect to the student's logits.

What varies (hypothesis): leading shapes (including zero rows and 2-D batches), vocabularies that
are not powers of two and student/teacher vocabularies that differ, ignored rows, labels >= V,
temperatures, -inf logits, row-strided (non-contiguous) logits, JSD's beta and skew KL's alpha
(endpoints included), HPD's given `sampled_ids`, and for Triton the vocabulary tile width, so that
small vocabularies still stream through many tiles.
"""

import pytest
import torch
from hypothesis import given, strategies as st

from hpd_kernels.ops.triton import utils as triton_utils
from helpers import OBJECTIVES, cases, grad_tolerance, library_loss, loss_tolerance, reference_loss

BACKENDS = ("torch", "triton")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _cotangent(loss, seed=1):
    """A scalar to differentiate: the loss itself, or a random mix of the per-row losses."""
    if loss.dim() == 0:
        return loss
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (loss.double() * weights).sum()


def _check(case, backend):
    student = case.student.detach().clone().requires_grad_(True)
    loss = library_loss(case, student, backend)
    ref_student = case.student.detach().double().requires_grad_(True)
    ref = reference_loss(case, ref_student)

    assert loss.shape == ref.shape
    assert torch.isfinite(ref).all(), "the case generator made an infinite reference loss"
    rtol, atol = loss_tolerance(case)
    if case.reduction == "sum":
        atol *= max(1, case.student.shape[:-1].numel())
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)

    if case.student.shape[:-1].numel() == 0:
        return
    (grad,) = torch.autograd.grad(_cotangent(loss), student)
    (grad_ref,) = torch.autograd.grad(_cotangent(ref), ref_student)
    assert grad.dtype == case.student.dtype and grad.shape == case.student.shape
    assert torch.isfinite(grad_ref).all()
    rtol, atol = grad_tolerance(case)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(data=st.data())
def test_matches_reference(objective, backend, dtype, data):
    case = data.draw(cases(objective, dtype), label="case")
    if backend == "triton":
        block_v = data.draw(st.sampled_from([16, 64, 4096]), label="max_block_v")
        previous, triton_utils.MAX_BLOCK_V = triton_utils.MAX_BLOCK_V, block_v
        try:
            _check(case, backend)
        finally:
            triton_utils.MAX_BLOCK_V = previous
    else:
        _check(case, backend)
