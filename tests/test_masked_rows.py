"""Rows without a distribution: every logit of the student's (or the teacher's) row is `-inf` over
the shared vocabulary. Defined behaviour, the same for every objective, both backends, the
fused-linear path and vocabulary-parallel slices (tests/test_vocab_parallel.py): such a row
contributes 0 to the loss and gets gradient 0; it still counts as an active row (its label says
so), so `"mean"` divides by the same count as for any other batch. Every other row is exactly what
it would be without the masked ones, checked against the float64 reference with those rows ignored.

Tolerances: float64 throughout, so the library must agree with the reference to ~1e-12 relative
(both compute the same formulas; the kernels' base-2 reorderings cost a few ulps per term).
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hpd_kernels
from hpd_kernels import reference
from helpers import IGNORE, OBJECTIVES, REFERENCE_LOSSES

TOL = dict(rtol=1e-10, atol=1e-12)


@st.composite
def masked_case(draw):
    rows, vocab = draw(st.integers(2, 7)), draw(st.integers(3, 40))
    extra = draw(st.sampled_from([0, 0, 3]))  # a wider student: its masked row is -inf on the shared part only
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = torch.randn(rows, vocab + extra, generator=generator, dtype=torch.float64)
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    masked = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.sampled_from(["student", "teacher"])),
                           min_size=1, max_size=3))
    for row, side in masked:
        (student if side == "student" else teacher)[row, :vocab] = -math.inf
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[draw(st.integers(0, rows - 1))] = IGNORE if draw(st.booleans()) else labels[0]
    sampled = torch.randint(0, vocab, (rows,), generator=generator)
    return student, teacher, labels, sampled, sorted({row for row, _ in masked}), draw(st.sampled_from([0.7, 1.0]))


def _library(objective, student, teacher, labels, sampled, temperature, backend, reduction):
    options = dict(temperature=temperature, reduction=reduction, backend=backend)
    if objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, teacher, labels, sampled_ids=sampled, **options)
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, **options)


def _reference_without(objective, student, teacher, labels, sampled, temperature, masked):
    """The float64 reference with the masked rows ignored (and their -inf replaced, unread)."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[masked] = False
    labels = torch.where(keep, labels, IGNORE)
    student = torch.where(keep[:, None], student, 0.0)
    teacher = torch.where(keep[:, None], teacher, 0.0)
    options = dict(temperature=temperature, reduction="sum")
    if objective == "hpd":
        return reference.hybrid_kl_loss(student, teacher, labels, sampled, **options)
    return REFERENCE_LOSSES[objective](student, teacher, labels, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=25, deadline=None)
@given(case=masked_case())
def test_masked_rows_contribute_zero_and_get_no_gradient(objective, backend, case):
    student, teacher, labels, sampled, masked, temperature = case
    library_student = student.clone().requires_grad_(True)
    per_row = _library(objective, library_student, teacher, labels, sampled, temperature, backend, "none")
    assert torch.isfinite(per_row).all(), per_row
    assert (per_row[masked] == 0).all()
    grad, = torch.autograd.grad(per_row.sum(), library_student)
    assert torch.isfinite(grad).all() and (grad[masked] == 0).all()

    reference_student = torch.where(torch.isfinite(student), student, 0.0).requires_grad_(True)
    expected = _reference_without(objective, reference_student, teacher, labels, sampled, temperature, masked)
    expected_grad, = torch.autograd.grad(expected, reference_student)
    torch.testing.assert_close(per_row.sum(), expected.detach(), **TOL)
    keep = [row for row in range(len(labels)) if row not in masked]
    torch.testing.assert_close(grad[keep], expected_grad[keep], **TOL)

    # "mean" divides by the active rows, masked ones included (they are labelled rows).
    mean = _library(objective, student, teacher, labels, sampled, temperature, backend, "mean")
    active = int(((labels != IGNORE) & (labels < teacher.shape[1])).sum())
    torch.testing.assert_close(mean, per_row.detach().sum() / max(active, 1), **TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_rows_in_kernel_draw(backend):
    """HPD drawing y_hat itself: a masked row does not poison the batch."""
    student, teacher = torch.randn(5, 31, dtype=torch.float64), torch.randn(5, 31, dtype=torch.float64)
    student[1], teacher[3] = -math.inf, -math.inf
    student.requires_grad_(True)
    loss, details = hpd_kernels.hybrid_kl_loss(student, teacher, torch.arange(5) * 3, seed=7, backend=backend,
                                               return_details=True)
    grad, = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[[1, 3]] == 0).all() and (details.label_weight[[1, 3]] == 0).all()
    assert (details.sample_weight[[1, 3]] == 0).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_masked_rows_fused_linear(objective):
    """The fused-linear path (teacher given as logits, one of its rows masked) agrees with the same
    loss with that row ignored, values and gradients."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, 29, generator=generator, dtype=torch.float64)
    teacher[4] = -math.inf
    labels = torch.randint(0, 29, (9,), generator=generator)
    sampled = torch.randint(0, 29, (9,), generator=generator)
    ignored = labels.clone()
    ignored[4] = IGNORE

    def loss(labels, teacher):
        options = dict(teacher_logits=teacher, reduction="sum", chunk_size=4, backend="torch")
        if objective == "hpd":
            return hpd_kernels.fused_linear_hybrid_kl_loss(hidden, weight, labels=labels, sampled_ids=sampled,
                                                           **options)
        return hpd_kernels.fused_linear_divergence_loss(hidden, weight, labels=labels, divergence=objective,
                                                        **options)

    masked = loss(labels, teacher)
    masked_grads = torch.autograd.grad(masked, (hidden, weight))
    expected = loss(ignored, torch.where(torch.isfinite(teacher), teacher, 0.0))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(masked, expected, **TOL)
    for got, want in zip(masked_grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)
