"""The public API's contract: bad input is refused before any kernel runs, with a message naming
the argument; edge cases (zero rows, all rows ignored, NaN) give the spec's answers."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hpd_kernels
from hpd_kernels import reference

BACKENDS = ("torch", "triton")
ALL_LOSSES = [(name, fn) for name, fn in hpd_kernels.DIVERGENCE_LOSSES.items()] + [("hpd", hpd_kernels.hybrid_kl_loss)]


def _inputs(n=6, vocab=11, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(n, vocab, generator=generator, dtype=dtype)
    teacher = torch.randn(n, vocab, generator=generator, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    return student, teacher, labels


@pytest.mark.parametrize("call,message", [
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t[:3], y), "leading dimensions"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y.float()), "labels must have an integer dtype"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y[:2]), r"labels must have shape \(6,\)"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s.long(), t, y), "student_logits must be float16, bfloat16"),
    (lambda s, t, y: hpd_kernels.reverse_kl_loss(s, t.int(), y), "teacher_logits must be float16"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t.to("meta"), y), "teacher_logits is on meta"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y.to("meta")), "labels is on meta"),
    (lambda s, t, y: hpd_kernels.tvd_loss(s, t, y, temperature=0.0), "temperature must be a finite number > 0"),
    (lambda s, t, y: hpd_kernels.tvd_loss(s, t, y, temperature=-1.0), "temperature"),
    (lambda s, t, y: hpd_kernels.tvd_loss(s, t, y, temperature=math.nan), "temperature"),
    (lambda s, t, y: hpd_kernels.generalized_jsd_loss(s, t, y, beta=1.5), r"beta must be a number in \[0, 1\]"),
    (lambda s, t, y: hpd_kernels.skew_forward_kl_loss(s, t, y, alpha=-0.1), "alpha must be a number in"),
    (lambda s, t, y: hpd_kernels.skew_reverse_kl_loss(s, t, y, alpha=2), "alpha"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y, reduction="avg"), "reduction must be one of"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y, backend="cuda"), "backend must be one of"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y - 50), "labels must be token ids >= 0 or ignore_index"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s[:, :0], t, y), "vocab >= 1"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, None), "labels are required"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, sampled_ids=y + 11), r"sampled_ids must lie in \[0, 11\)"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, sampled_ids=y[:3]), "sampled_ids must have shape"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, sampled_ids=y.double()), "sampled_ids must have an integer"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, fkl_weight=math.inf), "fkl_weight must be a finite"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, seed=1.5), "seed must be an int"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, reduction="max"), "reduction must be one of"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y, ignore_index=1.5), "ignore_index must be an int"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, ignore_index=True), "ignore_index must be an int"),
    (lambda s, t, y: hpd_kernels.tvd_loss(s, t, y, num_items_in_batch=torch.tensor(0)), "num_items_in_batch must be > 0"),
    (lambda s, t, y: hpd_kernels.hybrid_kl_loss(s, t, y, num_items_in_batch=torch.tensor(-3.0)),
     "num_items_in_batch must be > 0"),
    (lambda s, t, y: hpd_kernels.generalized_jsd_loss(
        s, t, y, num_items_in_batch=torch.tensor(math.nan)), "num_items_in_batch must be > 0"),
    (lambda s, t, y: hpd_kernels.forward_kl_loss(s, t, y, num_items_in_batch=torch.tensor([True])),
     "num_items_in_batch must be a number or a one-element real tensor"),
])
def test_bad_input_is_refused_with_a_clear_message(call, message):
    student, teacher, labels = _inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        call(student, teacher, labels)


def test_numpy_scalars_are_numbers():
    """NumPy scalars (a config read with NumPy, a value from an array) are accepted like Python's."""
    student, teacher, labels = _inputs()
    expected = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=3, temperature=0.5, fkl_weight=0.7,
                                          backend="torch")
    got = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=np.int64(3), temperature=np.float32(0.5),
                                     fkl_weight=np.float64(0.7), ignore_index=np.int32(-100), backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    hpd_kernels.generalized_jsd_loss(student, teacher, labels, beta=np.float32(0.25), backend="torch")


def test_sampled_ids_on_ignored_rows_are_not_checked():
    student, teacher, labels = _inputs()
    labels[0] = -100
    sampled = labels.clamp(min=0)
    sampled[0] = 10_000
    hpd_kernels.hybrid_kl_loss(student, teacher, labels, sampled_ids=sampled, backend="torch")


def test_triton_backend_without_interpreter_on_cpu_is_a_clear_error():
    code = ("import torch, hpd_kernels\n"
            "s = torch.randn(2, 5)\n"
            "try:\n"
            "    hpd_kernels.forward_kl_loss(s, s, backend='triton')\n"
            "except RuntimeError as error:\n"
            "    print(error)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "backend='triton' cannot run on cpu" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn", ALL_LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows_and_all_ignored_give_zero_loss_and_zero_grad(name, fn, backend, reduction):
    for n_rows, label in ((0, 0), (5, -100)):
        student, teacher, _ = _inputs(n=n_rows)
        student.requires_grad_(True)
        labels = torch.full((n_rows,), label, dtype=torch.long)
        loss = fn(student, teacher, labels, reduction=reduction, backend=backend)
        assert torch.equal(loss, torch.zeros_like(loss)) and not torch.isnan(loss).any()
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert grad.shape == student.shape and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn", ALL_LOSSES)
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_nan_or_plus_inf_logits_give_nan_never_a_silent_zero(name, fn, backend, poison):
    student, teacher, labels = _inputs()
    student[2, 4] = poison
    loss = fn(student, teacher, labels, backend=backend, reduction="none")
    assert torch.isnan(loss[2]), loss
    assert torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_never_gets_a_gradient(backend):
    student, teacher, labels = _inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for name, fn in ALL_LOSSES:
        loss = fn(student, teacher, labels, backend=backend)
        loss.backward()
        assert teacher.grad is None, name
        assert student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_inputs(backend):
    student, teacher, labels = _inputs(dtype=torch.float16)
    student.requires_grad_(True)
    loss = hpd_kernels.reverse_kl_loss(student, teacher, labels, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = reference.reverse_kl_loss(ref_student, teacher.double(), labels)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2.0**-10, atol=1e-6)


def test_criterion_modules_match_functions():
    student, teacher, labels = _inputs()
    pairs = [
        (hpd_kernels.ForwardKLLoss(temperature=2.0), lambda: hpd_kernels.forward_kl_loss(student, teacher, labels, temperature=2.0)),
        (hpd_kernels.ReverseKLLoss(), lambda: hpd_kernels.reverse_kl_loss(student, teacher, labels)),
        (hpd_kernels.GeneralizedJSDLoss(beta=0.3), lambda: hpd_kernels.generalized_jsd_loss(student, teacher, labels, beta=0.3)),
        (hpd_kernels.SkewForwardKLLoss(alpha=0.2), lambda: hpd_kernels.skew_forward_kl_loss(student, teacher, labels, alpha=0.2)),
        (hpd_kernels.SkewReverseKLLoss(alpha=0.2), lambda: hpd_kernels.skew_reverse_kl_loss(student, teacher, labels, alpha=0.2)),
        (hpd_kernels.TVDLoss(reduction="sum"), lambda: hpd_kernels.tvd_loss(student, teacher, labels, reduction="sum")),
    ]
    for module, call in pairs:
        assert torch.equal(module(student, teacher, labels), call())
    hpd = hpd_kernels.HybridKLLoss(fkl_weight=0.5, rkl_weight=2.0)
    assert torch.equal(hpd(student, teacher, labels, seed=3),
                       hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=3, fkl_weight=0.5, rkl_weight=2.0))
    assert "fkl_weight=0.5" in repr(hpd)


def test_divergence_losses_map_each_name_to_its_own_function():
    """`DIVERGENCE_LOSSES` (library and reference) holds every registry divergence, in the registry's
    order, each under its own name: the function computes `divergence_loss(divergence=name)`."""
    student, teacher, labels = _inputs()
    assert tuple(hpd_kernels.DIVERGENCE_LOSSES) == tuple(reference.DIVERGENCE_LOSSES) == hpd_kernels.registry.DIVERGENCES
    for name, fn in hpd_kernels.DIVERGENCE_LOSSES.items():
        assert torch.equal(fn(student, teacher, labels, backend="torch"),
                           hpd_kernels.divergence_loss(student, teacher, labels, divergence=name, backend="torch"))
        assert reference.DIVERGENCE_LOSSES[name].__name__ == fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_kl_weight_survives_student_underflow(backend):
    """At alpha = 0 skew forward KL is forward KL, whose weight is p. Where q underflows to 0 in
    float32 but p does not, (1 - alpha) p q / m must still be p: computed from logs, not from the
    underflowed q (found by the property tests in CI)."""
    student = torch.tensor([[0.0, -60.0, 5.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    loss = hpd_kernels.skew_forward_kl_loss(student, teacher, alpha=0.0, temperature=0.5, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = reference.forward_kl_loss(ref_student, teacher.double(), temperature=0.5)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", ["forward_kl", "jsd", "tvd"])
def test_log_probabilities_as_the_readme_says(objective, backend):
    """Log-probabilities at T = 1 serve at every temperature; already tempered ones go in at
    `temperature=1` with the student's logits divided by T (README, "Coming from another library")."""
    generator = torch.Generator().manual_seed(4)
    student = (torch.randn(5, 23, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(5, 23, generator=generator, dtype=torch.float64) * 2
    labels = torch.tensor([1, 2, -100, 4, 5])
    loss_fn, temperature = hpd_kernels.DIVERGENCE_LOSSES[objective], 2.5
    expected = loss_fn(student, teacher, labels, temperature=temperature, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected, student)
    stored = loss_fn(student, torch.log_softmax(teacher, -1), labels, temperature=temperature, backend=backend)
    tempered = loss_fn(student / temperature, torch.log_softmax(teacher / temperature, -1), labels, backend=backend)
    for loss in (stored, tempered):
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.autograd.grad(loss, student)[0], expected_grad, rtol=1e-10, atol=1e-13)
