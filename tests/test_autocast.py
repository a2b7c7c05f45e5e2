"""The fused-linear losses under `torch.autocast` (the usual mixed-precision setup: fp32 lm_head
weights, hidden states from an autocast model): the chunk GEMMs run in autocast's dtype, as a
`torch.nn.Linear` would, and each gradient returns in its input's dtype.

Tolerances: the autocast call must equal, bit for bit, the same loss called on operands cast to
bf16 by hand (that is what autocast means); against the float32 loss, bf16 rounding of the logits
(8 bits of mantissa, relative 2^-9 per logit, summed over tens of terms) allows 3e-2 relative on the
loss and 5e-2 of the largest gradient entry.
"""

import pytest
import torch

import hpd_kernels
from helpers import OBJECTIVES

ROWS, HIDDEN, VOCAB, TEACHER_HIDDEN = 11, 16, 37, 12


def _problem():
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    return dict(hidden=randn(ROWS, HIDDEN), weight=randn(VOCAB, HIDDEN) / 3, bias=randn(VOCAB) / 3,
                teacher_hidden=randn(ROWS, TEACHER_HIDDEN), teacher_weight=randn(VOCAB, TEACHER_HIDDEN) / 3,
                labels=torch.randint(0, VOCAB, (ROWS,), generator=generator))


def _loss(objective, hidden, weight, bias, teacher_hidden, teacher_weight, labels, backend):
    options = dict(student_bias=bias, chunk_size=4, backend=backend)
    if objective == "hpd":
        return hpd_kernels.fused_linear_hybrid_kl_loss(hidden, weight, teacher_hidden, teacher_weight, labels, seed=3,
                                                       **options)
    return hpd_kernels.fused_linear_divergence_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                                    divergence=objective, **options)


def _run(objective, backend, cast=None, autocast=False):
    problem = _problem()
    params = [problem[name].requires_grad_(True) for name in ("hidden", "weight", "bias")]
    operands = [tensor.to(cast) for tensor in params + [problem["teacher_hidden"], problem["teacher_weight"]]] \
        if cast else params + [problem["teacher_hidden"], problem["teacher_weight"]]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _loss(objective, *operands, problem["labels"], backend)
    grads = torch.autograd.grad(loss, params)
    return loss, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_autocast_bf16_step_matches_explicit_cast_and_fp32(objective, backend):
    loss, grads = _run(objective, backend, autocast=True)
    assert loss.dtype == torch.float32  # accumulated in float32, as every bf16 loss is
    assert [grad.dtype for grad in grads] == [torch.float32] * 3  # each input's own dtype

    by_hand, by_hand_grads = _run(objective, backend, cast=torch.bfloat16)
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=0)
    for grad, expected in zip(grads, by_hand_grads):
        torch.testing.assert_close(grad, expected.float(), rtol=0, atol=0)

    exact, exact_grads = _run(objective, backend)
    torch.testing.assert_close(loss, exact, rtol=3e-2, atol=3e-3)
    for grad, expected in zip(grads, exact_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=5e-2 * expected.abs().max().item())


def test_bf16_hidden_with_fp32_weight_under_autocast():
    """An autocast model's bf16 hidden states with the fp32 lm_head: accepted under autocast (the
    gradient of the bf16 hidden states is bf16), refused outside it with a message that says why."""
    problem = _problem()
    hidden = problem["hidden"].bfloat16().requires_grad_(True)
    weight = problem["weight"].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hpd_kernels.fused_linear_forward_kl_loss(hidden, weight, problem["teacher_hidden"],
                                                        problem["teacher_weight"], problem["labels"], backend="torch")
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="must share a dtype .or run under torch.autocast"):
        hpd_kernels.fused_linear_forward_kl_loss(hidden, weight, problem["teacher_hidden"], problem["teacher_weight"],
                                                 problem["labels"], backend="torch")
