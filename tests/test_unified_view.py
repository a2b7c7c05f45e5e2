"""The spec's unified view, as a test: for every objective, the library's gradient equals the
gradient of the surrogate `L_w = -sum_v w(v) log q(v)` built from `reference.token_weights`
(detached weights), on both backends, including -inf logits, ignored rows and mismatched
vocabularies. The same check run on `reference/` itself proves the spec's weight table against the
reference's autograd."""

import pytest
import torch
from hypothesis import given, strategies as st

from hpd_kernels import reference
from helpers import OBJECTIVES, cases, grad_tolerance, library_loss, reference_loss, reference_weights


def _surrogate_grad(case):
    student = case.student.detach().double().requires_grad_(True)
    surrogate = reference.weighted_log_likelihood(
        student, reference_weights(case), case.labels, temperature=case.temperature, ignore_index=-100,
        reduction="mean")
    return torch.autograd.grad(surrogate, student)[0]


def _mean_case(objective, dtype=torch.float64):
    return cases(objective, dtype, reductions=("mean",), max_rows=24, max_vocab=300)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(data=st.data())
def test_gradient_is_reweighted_log_likelihood(objective, backend, data):
    case = data.draw(_mean_case(objective), label="case")
    if case.student.shape[:-1].numel() == 0:
        return
    student = case.student.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(library_loss(case, student, backend), student)
    expected = _surrogate_grad(case)
    rtol, atol = grad_tolerance(case)
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("objective", OBJECTIVES)
@given(data=st.data())
def test_reference_autograd_agrees_with_weight_table(objective, data):
    case = data.draw(_mean_case(objective), label="case")
    if case.student.shape[:-1].numel() == 0:
        return
    student = case.student.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_loss(case, student), student)
    rtol, atol = grad_tolerance(case)
    torch.testing.assert_close(grad, _surrogate_grad(case), rtol=rtol, atol=atol)


def test_surrogate_check_can_fail():
    """Guard against a vacuous check: a wrong weight table (forward KL's weights for reverse KL)
    gives a gradient the comparison rejects."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 50, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 50, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad(reference.reverse_kl_loss(student, teacher), student)
    wrong = reference.token_weights(student, teacher, objective="forward_kl")
    surrogate = reference.weighted_log_likelihood(student, wrong)
    (wrong_grad,) = torch.autograd.grad(surrogate, student)
    assert not torch.allclose(grad, wrong_grad, rtol=1e-6, atol=1e-9)
