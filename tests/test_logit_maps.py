"""Logit soft-capping and logit scales (`student_softcap`, `student_logit_scale` and the teacher's) in
every loss, and the student's entropy per row (`return_entropy`), against `reference/`.

The reference applies `reference.mapped_logits` (`softcap * tanh(scale * z / softcap)`) to the
logits and differentiates through it with autograd; the library applies the map inside its passes
and chains the gradient through the `tanh` itself. Float64, hypothesis-drawn problems (the shapes,
masks, vocabularies and temperatures of `helpers.cases`) and caps and scales, both backends,
logits-level and fused-linear, with the hard-label term.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, strategies as st

import hpd_kernels
from hpd_kernels import reference
from helpers import IGNORE, OBJECTIVES, cases, grad_tolerance, loss_tolerance, reference_loss

BACKENDS = ("torch", "triton")
SCALES = (0.5, 1.0, 1.7)
SOFTCAPS = (None, 0.8, 5.0, 30.0)


@st.composite
def logit_maps(draw):
    """The public keywords of a student and a teacher map, never both identities."""
    maps = dict(student_logit_scale=draw(st.sampled_from(SCALES)), student_softcap=draw(st.sampled_from(SOFTCAPS)),
                teacher_logit_scale=draw(st.sampled_from(SCALES)), teacher_softcap=draw(st.sampled_from(SOFTCAPS)))
    if maps["student_softcap"] is None and maps["teacher_softcap"] is None:
        maps["student_softcap"] = 5.0
    return maps


def _mapped(logits, maps, side):
    return reference.mapped_logits(logits, scale=maps[f"{side}_logit_scale"], softcap=maps[f"{side}_softcap"])


def _library(case, student, backend, maps, **extra):
    kwargs = dict(case.kwargs(), backend=backend, **maps, **extra)
    if case.objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, case.teacher, case.labels, **kwargs)
    return hpd_kernels.DIVERGENCE_LOSSES[case.objective](student, case.teacher, case.labels, **kwargs)


def _active(case):
    rows = case.student.shape[:-1]
    if case.labels is None:
        return torch.ones(rows, dtype=torch.bool)
    return (case.labels != IGNORE) & (case.labels >= 0) & (case.labels < case.vocab)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(data=st.data())
def test_mapped_losses_match_reference(objective, backend, data):
    """Values, gradients and entropies of every objective on soft-capped and scaled logits."""
    case = data.draw(cases(objective, torch.float64, max_rows=12, max_vocab=90), label="case")
    maps = data.draw(logit_maps(), label="maps")
    ce_weight = data.draw(st.sampled_from([0.0, 0.5])) if case.labels is not None else 0.0
    student = case.student.detach().clone().requires_grad_(True)
    loss, entropy = _library(case, student, backend, maps, ce_weight=ce_weight, return_entropy=True)

    raw = case.student.detach().clone().requires_grad_(True)
    mapped_student, mapped_teacher = _mapped(raw, maps, "student"), _mapped(case.teacher, maps, "teacher")
    mapped_case = dataclasses.replace(case, student=mapped_student.detach(), teacher=mapped_teacher)
    expected = reference_loss(dataclasses.replace(case, teacher=mapped_teacher), mapped_student)
    if ce_weight:
        expected = expected + ce_weight * reference.sft_loss(
            mapped_student[..., :case.vocab], torch.where(_active(case), case.labels, IGNORE),
            temperature=case.temperature, ignore_index=IGNORE, reduction=case.reduction)
    rtol, atol = loss_tolerance(mapped_case)
    atol *= (1 + ce_weight) * (max(1, case.student.shape[:-1].numel()) if case.reduction == "sum" else 1)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)

    expected_entropy = torch.where(_active(case), reference.student_entropy(
        mapped_student.detach(), mapped_teacher, temperature=case.temperature), 0.0)
    assert entropy.shape == case.student.shape[:-1] and not entropy.requires_grad
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-10, atol=1e-12 * (1 + math.log(case.vocab)))

    if case.student.shape[:-1].numel() == 0:
        return
    cotangent = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * cotangent).sum(), student)
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), raw)
    _, atol = grad_tolerance(mapped_case)
    largest_slope = max(maps["student_logit_scale"], 1.0)
    torch.testing.assert_close(grad, expected_grad, rtol=0.0, atol=(1 + ce_weight) * largest_slope * atol + 1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fused_linear_mapped_losses_match_reference(objective, backend):
    """From hidden states, in chunks: the loss, `dL/dh`, `dL/dW` and the entropy on mapped logits."""
    gen = torch.Generator().manual_seed(7)
    rows, hidden_size, student_vocab, teacher_vocab, temperature = 11, 6, 37, 33, 0.7
    student_hidden = torch.randn(rows, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    student_weight = (2 * torch.randn(student_vocab, hidden_size, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher_hidden = torch.randn(rows, 2 * hidden_size, generator=gen, dtype=torch.float64)
    teacher_weight = 2 * torch.randn(teacher_vocab, 2 * hidden_size, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, teacher_vocab, (rows,), generator=gen)
    labels[[1, 6]] = IGNORE
    maps = dict(student_logit_scale=0.8, student_softcap=4.0, teacher_logit_scale=1.3, teacher_softcap=None)
    options = dict(temperature=temperature, ce_weight=0.3, chunk_size=4, backend=backend, reduction="sum", **maps)
    if objective == "hpd":
        loss, entropy = hpd_kernels.fused_linear_hybrid_kl_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, sampled_ids=(labels * 5) % 31,
            return_entropy=True, **options)
    else:
        loss, entropy = hpd_kernels.fused_linear_divergence_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence=objective,
            return_entropy=True, **options)
    grads = torch.autograd.grad(loss, (student_hidden, student_weight))

    student_logits = _mapped(student_hidden @ student_weight.T, maps, "student")
    teacher_logits = _mapped(teacher_hidden @ teacher_weight.T, maps, "teacher")
    kept = dict(temperature=temperature, ignore_index=IGNORE, reduction="sum")
    if objective == "hpd":
        expected = reference.hybrid_kl_loss(student_logits, teacher_logits, labels, (labels * 5) % 31, **kept)
    else:
        expected = reference.DIVERGENCE_LOSSES[objective](student_logits, teacher_logits, labels, **kept)
    expected = expected + 0.3 * reference.sft_loss(student_logits[:, :teacher_vocab], labels, **kept)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (student_hidden, student_weight))):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10)
    expected_entropy = torch.where(labels != IGNORE, reference.student_entropy(
        student_logits.detach(), teacher_logits, temperature=temperature), 0.0)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_maps_change_nothing(backend):
    """Scale 1 without a cap is the unmapped loss, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 29, generator=gen), torch.randn(5, 29, generator=gen)
    plain = hpd_kernels.generalized_jsd_loss(student, teacher, backend=backend, reduction="none")
    mapped = hpd_kernels.generalized_jsd_loss(student, teacher, backend=backend, reduction="none",
                                              student_logit_scale=1.0, teacher_softcap=None)
    assert torch.equal(plain, mapped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hpd_draws_from_the_mapped_student(backend):
    """A drawn `y_hat` is the draw of the mapped logits: the same seed gives the same ids whether the
    map is applied by the kernels or to the logits beforehand."""
    gen = torch.Generator().manual_seed(5)
    student = 4 * torch.randn(64, 23, generator=gen, dtype=torch.float64)
    teacher = torch.randn(64, 23, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 23, (64,), generator=gen)
    _, inside = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=11, backend=backend, return_details=True,
                                           student_softcap=2.0, student_logit_scale=0.5)
    _, outside = hpd_kernels.hybrid_kl_loss(reference.mapped_logits(student, scale=0.5, softcap=2.0), teacher, labels,
                                            seed=11, backend=backend, return_details=True)
    _, unmapped = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=11, backend=backend, return_details=True)
    assert torch.equal(inside.sampled_ids, outside.sampled_ids)
    assert not torch.equal(inside.sampled_ids, unmapped.sampled_ids)   # the cap flattens q: other draws


@pytest.mark.parametrize("name, value", [
    ("student_logit_scale", 0.0), ("student_logit_scale", -1.0), ("teacher_logit_scale", math.inf),
    ("teacher_logit_scale", math.nan), ("student_logit_scale", True), ("student_logit_scale", "2"),
    ("student_softcap", 0.0), ("teacher_softcap", -30.0), ("student_softcap", math.inf), ("teacher_softcap", "30"),
])
def test_bad_caps_and_scales_are_refused_by_name(name, value):
    student = teacher = torch.zeros(2, 5)
    with pytest.raises((ValueError, TypeError), match=name):
        hpd_kernels.forward_kl_loss(student, teacher, **{name: value})
    with pytest.raises((ValueError, TypeError), match=name):
        hpd_kernels.fused_linear_jsd_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 3), torch.zeros(5, 3),
                                          **{name: value})


def test_return_entropy_must_be_a_bool():
    with pytest.raises(TypeError, match="return_entropy"):
        hpd_kernels.tvd_loss(torch.zeros(2, 5), torch.zeros(2, 5), return_entropy=1)
