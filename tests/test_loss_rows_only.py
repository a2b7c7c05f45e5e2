"""Only loss rows are projected in the fused-linear losses: rows outside the loss (here every other
row, so no run of them is long enough to skip as a block) cost no GEMM and no backend call, on both
backends, for a divergence and for HPD; and the values, gradients and HPD's draws are those of
every row computed (the float64 reference, and the logits-level loss drawing over the whole batch).
"""

import pytest
import torch

import hpd_kernels
from hpd_kernels import reference
from hpd_kernels.ops import chunked_linear
from helpers import IGNORE, REFERENCE_LOSSES

BACKENDS = ("torch", "triton")
N_ROWS, HIDDEN, VOCAB = 20, 6, 37


def _problem(seed=3):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    labels = torch.randint(0, VOCAB, (N_ROWS,), generator=generator)
    labels[1::2] = IGNORE  # scattered: every other row is outside the loss
    labels[4] = VOCAB + 3  # outside the shared vocabulary: outside the loss too
    return dict(student_hidden=randn(N_ROWS, HIDDEN), student_weight=randn(VOCAB, HIDDEN),
                teacher_hidden=randn(N_ROWS, HIDDEN), teacher_weight=randn(VOCAB + 2, HIDDEN), labels=labels)


def _loss(objective, problem, backend, reduction, **kwargs):
    if objective == "hpd":
        return hpd_kernels.fused_linear_hybrid_kl_loss(**problem, seed=11, backend=backend, reduction=reduction,
                                                       **kwargs)
    return hpd_kernels.fused_linear_divergence_loss(**problem, divergence=objective, backend=backend,
                                                    reduction=reduction, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["hpd", "jsd"])
def test_rows_outside_the_loss_are_never_projected(objective, backend, reduction, monkeypatch):
    projected, computed = [], []
    linear, forward_rows = chunked_linear._linear, chunked_linear.forward_rows

    def counting_linear(hidden, weight, bias):
        projected.append(hidden.shape[0])
        return linear(hidden, weight, bias)

    def counting_forward_rows(backend, student, *args, **kwargs):
        computed.append(student.shape[0])
        return forward_rows(backend, student, *args, **kwargs)

    monkeypatch.setattr(chunked_linear, "_linear", counting_linear)
    monkeypatch.setattr(chunked_linear, "forward_rows", counting_forward_rows)
    problem = _problem()
    problem["student_hidden"].requires_grad_(True)
    loss = _loss(objective, problem, backend, reduction, chunk_size=4)
    loss.sum().backward()
    in_loss = int(((problem["labels"] != IGNORE) & (problem["labels"] < VOCAB)).sum())
    passes = 2 if reduction == "none" else 1  # "none" rebuilds the logits in backward
    assert sum(projected) == 2 * passes * in_loss  # the student's and the teacher's GEMMs
    assert sum(computed) == passes * in_loss
    assert len(computed) == passes * -(-in_loss // 4)  # one backend call per chunk of 4 rows in the loss
    assert max(projected) <= 4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["hpd", "forward_kl", "jsd"])
def test_scattered_rows_outside_the_loss_match_the_reference(objective, backend, reduction):
    problem = _problem()
    leaves = [problem["student_hidden"].requires_grad_(True), problem["student_weight"].requires_grad_(True)]
    result = _loss(objective, problem, backend, reduction, chunk_size=3,
                   **({"return_details": True} if objective == "hpd" else {}))
    loss, details = result if objective == "hpd" else (result, None)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad((loss * weights).sum(), leaves)

    student = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    student_logits = student[0] @ student[1].T
    teacher_logits = problem["teacher_hidden"] @ problem["teacher_weight"].T
    if objective == "hpd":
        # Each row draws with the noise of its own index, as if every row were computed.
        whole = hpd_kernels.hybrid_kl_loss(student_logits.detach(), teacher_logits, problem["labels"], seed=11,
                                           backend=backend, return_details=True)[1]
        assert torch.equal(details.sampled_ids, whole.sampled_ids)
        ref = reference.hybrid_kl_loss(student_logits, teacher_logits, problem["labels"],
                                       details.sampled_ids.clamp(min=0), reduction=reduction)
    else:
        ref = REFERENCE_LOSSES[objective](student_logits, teacher_logits, problem["labels"], reduction=reduction)
    ref_grads = torch.autograd.grad((ref * weights).sum(), student)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-11)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    if reduction == "none":
        outside = (problem["labels"] == IGNORE) | (problem["labels"] >= VOCAB)
        assert torch.equal(loss[outside], torch.zeros_like(loss[outside]))
        assert torch.equal(grads[0][outside], torch.zeros_like(grads[0][outside]))
