"""`reference/` against the spec's formulas written out once more, row by row, in plain Python
floats: the reference is the executable spec, so it is checked against the spec's own text."""

import math

import pytest
import torch

from hpd_kernels import reference


def _log_softmax(row, temperature):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    lse = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - lse for x in scaled]


def _kl(log_a, log_b):
    return sum(math.exp(a) * (a - b) for a, b in zip(log_a, log_b) if a > -math.inf)


def _spec_row(objective, s_row, t_row, temperature, mix):
    log_q, log_p = _log_softmax(s_row, temperature), _log_softmax(t_row, temperature)
    mixture = lambda wa, la, wb, lb: [math.log(wa * math.exp(a) + wb * math.exp(b)) for a, b in zip(la, lb)]
    if objective == "forward_kl":
        return _kl(log_p, log_q)
    if objective == "reverse_kl":
        return _kl(log_q, log_p)
    if objective == "jsd":
        log_m = mixture(mix, log_p, 1 - mix, log_q)
        return mix * _kl(log_p, log_m) + (1 - mix) * _kl(log_q, log_m)
    if objective == "skew_forward_kl":
        return _kl(log_p, mixture(mix, log_p, 1 - mix, log_q))
    if objective == "skew_reverse_kl":
        return _kl(log_q, mixture(mix, log_q, 1 - mix, log_p))
    if objective == "tvd":
        return 0.5 * sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(log_p, log_q))
    raise AssertionError(objective)


def _spec_hpd_row(s_row, t_row, y, y_hat, temperature, lam_f, lam_r):
    log_q, log_p = _log_softmax(s_row, temperature), _log_softmax(t_row, temperature)
    d = lambda v: math.exp(log_q[v]) * (log_p[v] - log_q[v])
    under, over = d(y) > 0, d(y_hat) < 0
    w_y = lam_r * d(y) + lam_f * math.exp(log_p[y]) * under * (1 + over)
    w_hat = lam_r * d(y_hat) * over * (y_hat != y)
    return -(w_y * log_q[y] + w_hat * log_q[y_hat])


@pytest.mark.parametrize("objective,mix", [
    ("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.2), ("skew_forward_kl", 0.1),
    ("skew_reverse_kl", 0.3), ("tvd", None)])
def test_divergences_match_spec_formulas(objective, mix):
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(5, 13, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(5, 13, generator=generator, dtype=torch.float64) * 2
    fn = reference.DIVERGENCE_LOSSES[objective]
    kwargs = {} if mix is None else ({"beta": mix} if objective == "jsd" else {"alpha": mix})
    got = fn(student, teacher, temperature=1.5, reduction="none", **kwargs)
    expected = [_spec_row(objective, s.tolist(), t.tolist(), 1.5, mix) for s, t in zip(student, teacher)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_hpd_matches_spec_formula():
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    teacher = torch.randn(40, 9, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 9, (40,), generator=generator)
    sampled = torch.randint(0, 9, (40,), generator=generator)
    for lam_f, lam_r in [(1.0, 1.0), (0.3, 2.0)]:
        got = reference.hybrid_kl_loss(student, teacher, labels, sampled, fkl_weight=lam_f, rkl_weight=lam_r,
                                       temperature=0.8, reduction="none")
        expected = [_spec_hpd_row(s.tolist(), t.tolist(), int(y), int(h), 0.8, lam_f, lam_r)
                    for s, t, y, h in zip(student, teacher, labels, sampled)]
        assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # All four branches of the spec occur in this draw, so none is untested.
    log_q, log_p = torch.log_softmax(student / 0.8, -1), torch.log_softmax(teacher / 0.8, -1)
    under = (log_p - log_q).gather(1, labels[:, None])[:, 0] > 0
    over = (log_p - log_q).gather(1, sampled[:, None])[:, 0] < 0
    assert {(bool(a), bool(b)) for a, b in zip(under, over)} == {(False, False), (False, True), (True, False), (True, True)}


def test_jsd_endpoints_are_the_kl_divergences():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    teacher = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    assert torch.allclose(reference.generalized_jsd_loss(student, teacher, beta=0.0), reference.forward_kl_loss(student, teacher))
    assert torch.allclose(reference.generalized_jsd_loss(student, teacher, beta=1.0), reference.reverse_kl_loss(student, teacher))


def test_skew_kl_keeps_the_p_log_p_term_and_mixture_never_underflows():
    # Both log-probabilities below -104 at a token: a probability-space mixture would give 0 * log 0.
    student = torch.tensor([[0.0, -300.0, 5.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, -290.0, 4.0]], dtype=torch.float64)
    for fn in (reference.skew_forward_kl_loss, reference.skew_reverse_kl_loss, reference.generalized_jsd_loss):
        loss = fn(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # KL(p || p) = 0 exactly when the student equals the teacher.
    assert reference.skew_forward_kl_loss(teacher, teacher).abs() < 1e-15


def test_reference_handles_minus_inf_without_nan():
    student = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.5, -math.inf]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.3, -math.inf, 0.2], [1.0, 0.0, -math.inf]], dtype=torch.float64)
    for fn in (reference.forward_kl_loss, reference.reverse_kl_loss, reference.generalized_jsd_loss,
               reference.skew_forward_kl_loss, reference.skew_reverse_kl_loss, reference.tvd_loss):
        loss = fn(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss), fn.__name__
        assert torch.isfinite(grad).all(), fn.__name__
