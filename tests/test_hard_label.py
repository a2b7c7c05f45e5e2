"""The fused hard-label term: `loss = divergence + ce_weight * CE(y)` for every loss, logits-level
and fused-linear, both backends, with both parts returned when asked (`return_parts=True`).

CE is the cross-entropy of `softmax(s / T)` at the labels, the reference's `sft_loss` at the same
temperature, over the shared vocabulary (the spec crops both sides to it: the `q` being distilled). Checked in float64 against `reference.<divergence> + ce_weight * reference.sft_loss`,
values, parts and gradients, on random shapes (vocabularies that are not powers of two, a wider
student, ignored rows, temperatures, -inf logits where both sides agree), for every reduction.
Tolerance: 1e-10 relative and 1e-12 absolute, float64 rounding of the same formulas.
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
def hard_case(draw):
    rows, vocab = draw(st.integers(1, 7)), draw(st.integers(2, 40))
    extra = draw(st.sampled_from([0, 0, 3]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    student = torch.randn(rows, vocab + extra, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    if draw(st.booleans()):
        labels[draw(st.integers(0, rows - 1))] = IGNORE
    if draw(st.booleans()):  # a token neither side allows (never a label)
        column = draw(st.integers(0, vocab - 1))
        student[:, column] = teacher[:, column] = -math.inf
        labels = torch.where(labels == column, (column + 1) % vocab, labels)
    sampled = torch.where(labels >= 0, labels, 0).clone()
    sampled[::2] = (sampled[::2] + 1) % vocab
    if student.isinf().any():
        sampled = torch.where(student[torch.arange(rows), sampled].isinf(), labels.clamp(min=0), sampled)
    return (student, teacher, labels, sampled, draw(st.sampled_from([0.5, 1.0, 2.0])),
            draw(st.sampled_from([0.25, 1.0, 3.0])), draw(st.sampled_from(["mean", "sum", "none"])))


def _library(objective, student, teacher, labels, sampled, options):
    if objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, teacher, labels, sampled_ids=sampled, **options)
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, **options)


def _reference(objective, student, teacher, labels, sampled, temperature, reduction):
    options = dict(temperature=temperature, reduction=reduction)
    if objective == "hpd":
        soft = reference.hybrid_kl_loss(student, teacher, labels, sampled, **options)
    else:
        soft = REFERENCE_LOSSES[objective](student, teacher, labels, **options)
    # q is the student's softmax over the shared vocabulary (the spec's cropping), for both terms.
    return soft, reference.sft_loss(student[..., :teacher.shape[-1]], labels, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=20, deadline=None)
@given(case=hard_case())
def test_hard_label_term_matches_the_reference(objective, backend, case):
    student, teacher, labels, sampled, temperature, ce_weight, reduction = case
    library_student = student.clone().requires_grad_(True)
    loss, parts = _library(objective, library_student, teacher, labels, sampled,
                           dict(temperature=temperature, reduction=reduction, backend=backend, ce_weight=ce_weight,
                                return_parts=True))
    reference_student = student.clone().requires_grad_(True)
    soft, hard = _reference(objective, reference_student, teacher, labels, sampled, temperature, reduction)
    expected = soft + ce_weight * hard
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(parts.distillation, soft.detach(), **TOL)
    torch.testing.assert_close(parts.cross_entropy, hard.detach(), **TOL)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    grad, = torch.autograd.grad(loss, library_student, upstream)
    expected_grad, = torch.autograd.grad(expected, reference_student, upstream)
    torch.testing.assert_close(grad, torch.nan_to_num(expected_grad), **TOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_hard_label_term_fused_linear(objective, backend):
    """From hidden states (chunked, gradients in the forward for "mean", rebuilt for "none"): the
    same numbers as the logits-level loss on the full logits."""
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(29, 8, generator=generator, dtype=torch.float64)
    teacher = torch.randn(10, 29, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 29, (10,), generator=generator)
    labels[3] = IGNORE
    sampled = torch.randint(0, 29, (10,), generator=generator)
    for reduction in ("mean", "none"):
        options = dict(reduction=reduction, backend=backend, ce_weight=0.7, return_parts=True, temperature=0.8)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if objective == "hpd":
            loss, parts = hpd_kernels.fused_linear_hybrid_kl_loss(h, w, labels=labels, teacher_logits=teacher,
                                                                  sampled_ids=sampled, chunk_size=4, **options)
        else:
            loss, parts = hpd_kernels.fused_linear_divergence_loss(h, w, labels=labels, teacher_logits=teacher,
                                                                   divergence=objective, chunk_size=4, **options)
        grads = torch.autograd.grad(loss.sum(), (h, w))
        h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        expected, expected_parts = _library(objective, h2 @ w2.t(), teacher, labels, sampled, options)
        expected_grads = torch.autograd.grad(expected.sum(), (h2, w2))
        torch.testing.assert_close(loss, expected, **TOL)
        torch.testing.assert_close(parts.distillation, expected_parts.distillation, **TOL)
        torch.testing.assert_close(parts.cross_entropy, expected_parts.cross_entropy, **TOL)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, **TOL)


def test_hard_label_term_with_details_and_parts():
    student, teacher = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    labels = torch.tensor([1, 2, IGNORE, 4])
    loss, details, parts = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=2, ce_weight=0.5,
                                                      return_details=True, return_parts=True, backend="torch")
    plain, plain_details = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=2, return_details=True,
                                                      backend="torch")
    torch.testing.assert_close(parts.distillation, plain, **TOL)
    torch.testing.assert_close(loss, plain + 0.5 * parts.cross_entropy, **TOL)
    assert torch.equal(details.sampled_ids, plain_details.sampled_ids)
    torch.testing.assert_close(details.label_weight, plain_details.label_weight, **TOL)  # the spec's w_y, unchanged


@pytest.mark.parametrize("call,message", [
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y, ce_weight=-1.0), "ce_weight must be a finite number >= 0"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, ce_weight=math.nan), "ce_weight must be a finite"),
    (lambda s, t, y: hpd_kernels.tvd_loss(s, t, None, ce_weight=1.0), "ce_weight and return_parts need labels"),
    (lambda s, t, y: hpd_kernels.generalized_jsd_loss(s, t, None, return_parts=True), "need labels"),
])
def test_bad_hard_label_arguments(call, message):
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match=message):
        call(student, teacher, torch.tensor([0, 1, 2]))


def test_trainer_ce_weight_is_the_fused_term():
    """The trainer's `ce_weight` (T = 1) now rides on the loss: the same number as the separate
    cross-entropy pass it replaced."""
    from hpd_kernels.models import DecoderConfig, DecoderLM
    from hpd_kernels.training.criteria import shifted_labels
    from hpd_kernels.training.trainer import TrainConfig, batch_loss, collate

    torch.manual_seed(0)
    student = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2)).double()
    teacher = DecoderLM(DecoderConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2)).double()
    examples = [([1, 2, 3], [4, 5, 6, 2]), ([3, 1], [7, 8, 2]), ([5, 6, 7, 1], [9, 10, 2]), ([2], [3, 4, 5, 6, 2])]
    input_ids, loss_mask = collate(examples, 0, "cpu")
    config = TrainConfig(objective="fkl", backend="torch", ce_weight=0.3)
    loss, _ = batch_loss(config, student, teacher, input_ids, loss_mask, 0, seed=1)
    labels = shifted_labels(input_ids, loss_mask)
    attention = (input_ids != 0).long() | loss_mask
    logits = student.lm_head(student(input_ids, attention_mask=attention))
    expected = (hpd_kernels.forward_kl_loss(logits, teacher.lm_head(teacher(input_ids, attention_mask=attention)),
                                            labels, backend="torch")
                + 0.3 * torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE))
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("reduction,hint", [("batchmean", "reduction='mean'"), ("elementwise", "one value per token")])
def test_peer_reductions_say_how_to_get_the_same_number(reduction, hint):
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match=hint):
        hpd_kernels.forward_kl_loss(student, teacher, reduction=reduction)
