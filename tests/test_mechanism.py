"""`bench/mechanism.py`'s exact expected gradients, checked against `hpd_kernels.reference` (seconds)."""

import numpy as np
import pytest
import torch

from bench import mechanism
from hpd_kernels import reference

P = mechanism.teacher()
REGIMES = mechanism.data_distributions(P)


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("label, objective, params", mechanism.LABELLED_OBJECTIVES,
                         ids=[o[1] for o in mechanism.LABELLED_OBJECTIVES])
def test_closed_form_is_the_exact_expectation_of_reference_gradients(label, objective, params, regime):
    """Every (y, y_hat) enumerated through the reference, weighted by its probability: an exact check."""
    rng = np.random.default_rng(1)
    for s in (np.zeros(mechanism.K), rng.normal(size=mechanism.K), 3 * rng.normal(size=mechanism.K)):
        exact = mechanism.reference_expected_gradient(objective, s, P, REGIMES[regime], **params)
        np.testing.assert_allclose(mechanism.expected_gradient(objective, s, P, REGIMES[regime], **params),
                                   exact, rtol=0, atol=1e-13)


@pytest.mark.parametrize("fkl_weight, rkl_weight", [(1.0, 1.0), (2.0, 0.5)])
def test_hpd_expected_gradient_is_the_monte_carlo_mean_of_reference_gradients(fkl_weight, rkl_weight):
    """Independent of the enumeration: sampled y ~ d and y_hat ~ q through `reference.hybrid_kl_loss`."""
    s = np.random.default_rng(2).normal(size=mechanism.K)
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    for d in REGIMES.values():
        y = torch.multinomial(torch.as_tensor(d), n, replacement=True, generator=generator)
        student = torch.as_tensor(s).expand(n, -1).clone().requires_grad_(True)
        y_hat = reference.sample_student(student.detach(), generator=generator)
        loss = reference.hybrid_kl_loss(student, torch.log(torch.as_tensor(P)).expand(n, -1), y, y_hat,
                                        fkl_weight=fkl_weight, rkl_weight=rkl_weight, reduction="none").sum()
        per_sample = torch.autograd.grad(loss, student)[0].numpy()
        mean, sem = per_sample.mean(0), per_sample.std(0) / np.sqrt(n)
        expected = mechanism.expected_gradient("hpd", s, P, d, fkl_weight=fkl_weight, rkl_weight=rkl_weight)
        assert np.all(np.abs(mean - expected) < 5 * sem + 1e-12), (mean, expected, sem)


def test_teacher_is_a_fixed_point_of_every_distillation_objective():
    """Including HPD under deterministic data: at q = p every HPD weight is 0 (r = 0: neither under
    nor over). TVD is left out: its sign(p - q) sees the rounding of softmax(log p)."""
    for regime, d in REGIMES.items():
        for _, objective, params in mechanism.LABELLED_OBJECTIVES[1:]:
            if objective == "tvd":
                continue
            grad = mechanism.expected_gradient(objective, np.log(P), P, d, **params)
            assert np.abs(grad).max() < 1e-15, (regime, objective)


def test_forward_kl_and_sft_on_stochastic_data_converge_to_the_teacher():
    for objective in ("forward_kl", "sft"):
        sim = mechanism.simulate(objective, P, REGIMES["stochastic"], {}, t_end=10000.0, n_checkpoints=4)
        np.testing.assert_allclose(sim["final_q"], P, rtol=1e-2)   # the far tail relaxes at rate ~p(v)
        assert sim["final"]["kl_pq"] < 1e-8


def test_sft_on_deterministic_data_collapses_onto_the_data_token():
    sim = mechanism.simulate("sft", P, REGIMES["deterministic"], {}, t_end=1500.0, n_checkpoints=4)
    assert sim["final_q"][mechanism.MODE] > 0.99
