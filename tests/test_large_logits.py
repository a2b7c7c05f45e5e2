"""A few very large logits (1e4 to 1e30, either sign, student or teacher) among ordinary ones:
every objective, both backends, against float64 on the same float32 values.

The Triton forward/reverse KL once accumulated `E_p[t - s]` on raw logits and subtracted the
log-sum-exps after: with `t = 1e8` the float32 cancellation gave 0 for a loss of 3.33 (4.0 at
1e6). Differences are now taken against the running maxima (the maxima cancel exactly).

Tolerances: losses `2e-5 * (1 + |loss|)`: each term carries a float32 rounding of its log-
probability, `eps * |log q|` with `|log q|` up to ~1e30/T where a huge logit sits on the other
side, which is what `|loss|` measures; elsewhere the ordinary 1e-5-level float32 error. Gradients:
`2e-5 * max |g|` per row (a softmax next to a huge logit is one-hot to float32 precision).
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import hpd_kernels
from hpd_kernels import reference
from helpers import OBJECTIVES, REFERENCE_LOSSES

MAGNITUDES = [1e4, 1e6, 1e8, 1e12, 1e20, 1e30]


@st.composite
def large_logit_case(draw):
    rows, vocab = draw(st.integers(1, 5)), draw(st.integers(3, 200))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = torch.randn(rows, vocab, generator=generator)
    teacher = torch.randn(rows, vocab, generator=generator)
    for _ in range(draw(st.integers(1, 3))):
        side = draw(st.sampled_from([student, teacher]))
        row, column = draw(st.integers(0, rows - 1)), draw(st.integers(0, vocab - 1))
        side[row, column] = draw(st.sampled_from([-1.0, 1.0])) * draw(st.sampled_from(MAGNITUDES))
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    sampled = torch.randint(0, vocab, (rows,), generator=generator)
    return student, teacher, labels, sampled, draw(st.sampled_from([0.5, 1.0, 2.0]))


def _loss(objective, student, teacher, labels, sampled, temperature, backend=None):
    options = dict(temperature=temperature, reduction="none")
    if backend is None:  # the reference, in the dtype it is given
        if objective == "hpd":
            return reference.hybrid_kl_loss(student, teacher, labels, sampled, **options)
        return REFERENCE_LOSSES[objective](student, teacher, labels, **options)
    if objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, teacher, labels, sampled_ids=sampled, backend=backend, **options)
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, backend=backend, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(case=large_logit_case())
def test_large_logits_match_float64(objective, backend, case):
    student, teacher, labels, sampled, temperature = case
    exact_student = student.double().requires_grad_(True)
    exact = _loss(objective, exact_student, teacher.double(), labels, sampled, temperature)
    library_student = student.clone().requires_grad_(True)
    value = _loss(objective, library_student, teacher, labels, sampled, temperature, backend)
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(value)), (value, exact)
    torch.testing.assert_close(value.double()[finite], exact.detach()[finite], rtol=2e-5,
                               atol=2e-5 * (1 + exact.detach()[finite].abs().max().item()) if finite.any() else 0)
    if not finite.all():
        return
    (exact_grad,) = torch.autograd.grad(exact.sum(), exact_student)
    (grad,) = torch.autograd.grad(value.sum(), library_student)
    options = dict(objective=objective, temperature=temperature)
    if objective == "hpd":
        options["sampled_ids"] = sampled
    weights = reference.token_weights(student.double(), teacher.double(), labels, **options)
    terms = (1 + weights.abs().amax(dim=1, keepdim=True) + weights.sum(dim=1, keepdim=True).abs()) / temperature
    assert ((grad.double() - exact_grad).abs() <= 4e-6 * terms).all(), (grad, exact_grad, terms)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("magnitude", [1e38, 3.4e38])
def test_float32_limit_is_never_a_wrong_finite_number(objective, backend, magnitude):
    """The domain's edge (README, "Numerics"): logits near float32's maximum overflow inside the
    base-2 arithmetic, and a loss near it overflows itself. The result is then inf or NaN, never a
    finite number that differs from float64."""
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, 20, generator=generator), torch.randn(4, 20, generator=generator)
    student[0, 3], teacher[1, 4], student[2, 5], teacher[2, 6], teacher[3, 1] = (
        magnitude, -magnitude, -magnitude, magnitude, magnitude)
    labels, sampled = torch.tensor([3, 4, 5, 1]), torch.tensor([0, 4, 6, 1])
    for temperature in (0.5, 1.0):
        exact = _loss(objective, student.double(), teacher.double(), labels, sampled, temperature)
        value = _loss(objective, student, teacher, labels, sampled, temperature, backend).double()
        finite = torch.isfinite(value)
        torch.testing.assert_close(value[finite], exact[finite], rtol=2e-5,
                                   atol=2e-5 * (1 + exact[finite].abs().max().item()) if finite.any() else 0)
