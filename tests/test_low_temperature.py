"""Accuracy at low temperature with large logits: as good as a float32 `log_softmax` implementation.

At T = 0.25-0.5 with logits of std 3 and a per-row offset, `|s / T|` reaches ~100. Forming
`log q = s / T - lse` (or `s * log2(e) / T - max * log2(e) / T`) rounds every log-probability at
the size of the logit, ~1e-5; `log_softmax` subtracts the row maximum first and rounds at the size
of `log q`. The kernels now do the same (`(s - max) * scale - log_sum`, stats keep the max and the
log-sum apart), and this test holds both backends to the error of a plain float32 implementation
built on `torch.log_softmax` (the reference run in float32, as TRL's and Liger's losses compute),
measured on the very same inputs against float64.

Tolerance: `error(library) <= 4 * error(float32 log_softmax reference) + 1e-7`, errors normwise
(`max |g - g64| / max |g64|`). Two correct float32 implementations of the same formula differ in
their rounding by small factors (summation order, where the exponent is taken), so an exact 1x bound
would fail on chance; before the change the Triton kernels exceeded the reference's error by 2-7x
on average and up to 38x on these inputs, which this bound rejects. 1e-7 is ~float32's epsilon.
"""

import pytest
import torch
from hypothesis import given, strategies as st

import hpd_kernels
import reference
from helpers import OBJECTIVES, REFERENCE_LOSSES

FACTOR, FLOOR = 4.0, 1e-7


def _gradient(loss_of, logits):
    logits = logits.detach().clone().requires_grad_(True)
    loss_of(logits).backward()
    return logits.grad.double()


def _error(gradient, exact):
    return ((gradient - exact).abs().max() / exact.abs().max().clamp(min=1e-300)).item()


@st.composite
def low_temperature_case(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(3, 400))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    offset = torch.rand(rows, 1, generator=generator) * 40 - 20   # large |s| without changing softmax much
    student = (torch.randn(rows, vocab, generator=generator) * 3 + offset).float()
    teacher = (torch.randn(rows, vocab, generator=generator) * 3 + offset).float()
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    sampled = torch.randint(0, vocab, (rows,), generator=generator)
    return student, teacher, labels, sampled, draw(st.sampled_from([0.25, 0.5]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(case=low_temperature_case())
def test_low_temperature_gradients_as_accurate_as_float32_log_softmax(objective, backend, case):
    student, teacher, labels, sampled, temperature = case
    if objective == "hpd":
        reference_loss = lambda s, t: reference.hybrid_kl_loss(s, t, labels, sampled, temperature=temperature)
        library_loss = lambda s: hpd_kernels.hybrid_kl_loss(s, teacher, labels, sampled_ids=sampled,
                                                            temperature=temperature, backend=backend)
    else:
        reference_loss = lambda s, t: REFERENCE_LOSSES[objective](s, t, labels, temperature=temperature)
        library_loss = lambda s: hpd_kernels.DIVERGENCES[objective](s, teacher, labels, temperature=temperature,
                                                                    backend=backend)
    exact = _gradient(lambda s: reference_loss(s, teacher.double()), student.double())
    float32_error = _error(_gradient(lambda s: reference_loss(s, teacher), student), exact)
    library_error = _error(_gradient(library_loss, student), exact)
    assert library_error <= FACTOR * float32_error + FLOOR, (library_error, float32_error)
