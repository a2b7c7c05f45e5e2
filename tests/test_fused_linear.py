"""Fused-linear losses against `reference/` on naively computed logits, for every objective and
both backends: values (every reduction) and the gradients of the student's hidden states, weight
and bias; chunk sizes that do not divide N; biases; mismatched vocabularies and hidden sizes; the
teacher given as hidden states + weight or as logits; HPD's in-kernel samples unchanged by chunking.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import hpd_kernels
from helpers import DIVERGENCES, IGNORE, REFERENCE_LOSSES, OBJECTIVES
from hpd_kernels import reference

BACKENDS = ("torch", "triton")


@st.composite
def problems(draw, dtype):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n_rows = draw(st.integers(1, 30))
    hidden_s, hidden_t = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    vocab_s = draw(st.integers(2, 90))
    vocab_t = draw(st.one_of(st.just(vocab_s), st.integers(2, 90)))
    vocab = min(vocab_s, vocab_t)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    problem = dict(
        student_hidden=randn(n_rows, hidden_s),
        student_weight=randn(vocab_s, hidden_s) / math.sqrt(hidden_s) * 2,
        student_bias=randn(vocab_s) if draw(st.booleans()) else None,
        labels=torch.where(torch.rand(n_rows, generator=gen) < 0.2, IGNORE, torch.randint(0, vocab, (n_rows,), generator=gen)),
        chunk_size=draw(st.sampled_from([None, 1, 3, 7, 64])),
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    teacher_hidden, teacher_weight = randn(n_rows, hidden_t), randn(vocab_t, hidden_t) / math.sqrt(hidden_t) * 2
    teacher_bias = randn(vocab_t) if draw(st.booleans()) else None
    if draw(st.booleans()):
        problem["teacher_logits"] = teacher_hidden @ teacher_weight.T + (0 if teacher_bias is None else teacher_bias)
    else:
        problem.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    return {key: (value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value)
            for key, value in problem.items()}


def _teacher_logits(problem):
    if "teacher_logits" in problem:
        return problem["teacher_logits"].double()
    bias = problem["teacher_bias"]
    return problem["teacher_hidden"].double() @ problem["teacher_weight"].double().T + (0 if bias is None else bias.double())


def _run(objective, problem, backend, seed=5):
    params = [name for name in ("student_hidden", "student_weight", "student_bias") if problem[name] is not None]
    leaves = {name: problem[name].detach().clone().requires_grad_(True) for name in params}
    kwargs = {key: value for key, value in problem.items() if key not in params}
    kwargs.update(leaves)
    student_hidden, student_weight = kwargs.pop("student_hidden"), kwargs.pop("student_weight")
    labels = kwargs.pop("labels")
    if objective == "hpd":
        loss, details = hpd_kernels.fused_linear_hybrid_kl_loss(student_hidden, student_weight, labels=labels, seed=seed,
                                                                backend=backend, return_details=True, **kwargs)
    else:
        loss, details = hpd_kernels.fused_linear_divergence_loss(student_hidden, student_weight, labels=labels,
                                                                 divergence=objective, backend=backend, **kwargs), None
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad((loss.double() * weights).sum(), [leaves[name] for name in params])
    return loss, details, dict(zip(params, grads)), weights


def _reference(objective, problem, sampled_ids, weights):
    params = [name for name in ("student_hidden", "student_weight", "student_bias") if problem[name] is not None]
    leaves = {name: problem[name].detach().double().requires_grad_(True) for name in params}
    bias = leaves.get("student_bias")
    student_logits = leaves["student_hidden"] @ leaves["student_weight"].T + (0 if bias is None else bias)
    kwargs = dict(temperature=problem["temperature"], reduction=problem["reduction"])
    if objective == "hpd":
        loss = reference.hybrid_kl_loss(student_logits, _teacher_logits(problem), problem["labels"], sampled_ids, **kwargs)
    else:
        loss = REFERENCE_LOSSES[objective](student_logits, _teacher_logits(problem), problem["labels"], **kwargs)
    (loss * weights).sum().backward()
    grads = {name: leaves[name].grad for name in params}
    # Each gradient element contracts dL/dlogits = -(r / T)(w - q W) with |h| or |W|, and dL/dlogits
    # is itself a difference that can cancel: its float32 error scales with (r / T)(1 + |w| + |W|)
    # (the 1 for W computed from log-sum-exps), so the bound contracts that magnitude instead.
    token_weights = reference.token_weights(student_logits.detach(), _teacher_logits(problem), problem["labels"],
                                            objective=objective, temperature=problem["temperature"],
                                            sampled_ids=sampled_ids)
    labels = problem["labels"]
    active = (labels >= 0) & (labels < token_weights.shape[1])
    row_scale = (weights if weights.dim() else torch.ones(len(labels), dtype=torch.float64)) * active
    if problem["reduction"] == "mean":
        row_scale = row_scale / max(int(active.sum()), 1)
    magnitude = torch.zeros_like(student_logits)
    magnitude[:, : token_weights.shape[1]] = (row_scale.abs() / problem["temperature"])[:, None] * (
        1 + token_weights.abs() + token_weights.sum(1, keepdim=True).abs())
    scales = {"student_hidden": magnitude @ leaves["student_weight"].detach().abs(),
              "student_weight": magnitude.T @ leaves["student_hidden"].detach().abs(),
              "student_bias": magnitude.sum(0)}
    return loss, grads, scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@given(data=st.data())
def test_fused_linear_matches_reference_float64(objective, backend, data):
    problem = data.draw(problems(torch.float64), label="problem")
    loss, details, grads, weights = _run(objective, problem, backend)
    sampled = None if details is None else details.sampled_ids.clamp(min=0)
    ref_loss, ref_grads, _ = _reference(objective, problem, sampled, weights)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-11)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["hpd", "jsd", "forward_kl"])
@given(data=st.data())
def test_fused_linear_float32(objective, backend, data):
    """float32 inputs against the float64 reference on the same rounded inputs. The logits come
    from float32 GEMMs (relative error ~H * 2^-24 of |h| |w|) and the losses accumulate in
    float32: each gradient element is held to 1e-4 of the contraction of absolute values it is
    made of (see `_reference`), ~10x headroom. HPD branches on log p(y) > log q(y): rows near that
    tie are dropped (see helpers._drop_ambiguous_rows)."""
    problem = data.draw(problems(torch.float32), label="problem")
    if objective == "hpd":
        student_logits = problem["student_hidden"].double() @ problem["student_weight"].double().T
        if problem["student_bias"] is not None:
            student_logits = student_logits + problem["student_bias"].double()
        gap = (torch.log_softmax(_teacher_logits(problem)[:, : student_logits.shape[1]] / problem["temperature"], -1)
               - torch.log_softmax(student_logits[:, : _teacher_logits(problem).shape[1]] / problem["temperature"], -1)).abs()
        problem["labels"] = torch.where((gap < 1e-3).any(dim=1), IGNORE, problem["labels"])
    loss, details, grads, weights = _run(objective, problem, backend)
    sampled = None if details is None else details.sampled_ids.clamp(min=0)
    ref_loss, ref_grads, scales = _reference(objective, problem, sampled, weights)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5 * max(1.0, ref_loss.abs().max().item()))
    for name, grad in grads.items():
        error = (grad.double() - ref_grads[name]).abs()
        bound = 1e-4 * (scales[name] + ref_grads[name].abs()) + 1e-9
        assert (error <= bound).all(), f"{name}: worst error {error.max().item():.3g}, bound there {bound[error.argmax() // bound.shape[-1] if bound.dim() > 1 else error.argmax()].min().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_never_changes_hpd_samples_or_values(backend):
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 23, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(61, 8, generator=generator, dtype=torch.float64)
    teacher_logits = torch.randn(2, 23, 64, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 61, (2, 23), generator=generator)
    outputs = [hpd_kernels.fused_linear_hybrid_kl_loss(hidden, weight, labels=labels, teacher_logits=teacher_logits,
                                                       seed=4, chunk_size=size, backend=backend, return_details=True)
               for size in (1, 5, 46, None)]
    logits_level = hpd_kernels.hybrid_kl_loss(hidden @ weight.T, teacher_logits, labels, seed=4, backend=backend,
                                              return_details=True)
    for loss, details in outputs + [logits_level]:
        assert torch.equal(details.sampled_ids, outputs[0][1].sampled_ids)
        torch.testing.assert_close(loss, outputs[0][0], rtol=1e-12, atol=1e-14)


def test_teacher_gets_no_gradient_and_bad_input_is_refused():
    hidden = torch.randn(4, 6, requires_grad=True)
    weight = torch.randn(10, 6, requires_grad=True)
    teacher_hidden = torch.randn(4, 5, requires_grad=True)
    teacher_weight = torch.randn(12, 5, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    loss = hpd_kernels.fused_linear_hybrid_kl_loss(hidden, weight, teacher_hidden, teacher_weight, labels, backend="torch")
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None and weight.grad is not None
    with pytest.raises(ValueError, match=r"student_weight must have shape \[vocab, 6\]"):
        hpd_kernels.fused_linear_forward_kl_loss(hidden, weight[:, :5], teacher_hidden, teacher_weight, labels)
    with pytest.raises(ValueError, match="teacher_hidden must share the leading dimensions"):
        hpd_kernels.fused_linear_tvd_loss(hidden, weight, teacher_hidden[:3], teacher_weight, labels)
    with pytest.raises(ValueError, match="either as teacher_logits or as teacher_hidden"):
        hpd_kernels.fused_linear_tvd_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                          teacher_logits=torch.randn(4, 12))
    with pytest.raises(ValueError, match="the teacher is required"):
        hpd_kernels.fused_linear_jsd_loss(hidden, weight, labels=labels)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        hpd_kernels.fused_linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, chunk_size=0)
    with pytest.raises(TypeError, match="student_weight .* and student_hidden .* must share a dtype"):
        hpd_kernels.fused_linear_jsd_loss(hidden, weight.double(), teacher_hidden, teacher_weight, labels)
    with pytest.raises(ValueError, match="divergence must be one of"):
        hpd_kernels.fused_linear_divergence_loss(hidden, weight, teacher_hidden, teacher_weight, labels, divergence="kl")
    with pytest.raises(ValueError, match=r"student_bias must have shape \[10\]"):
        hpd_kernels.fused_linear_jsd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, student_bias=torch.zeros(3))


def test_chunk_size_rule_follows_the_memory_budget():
    from hpd_kernels.ops.chunked_linear import CPU_CHUNK_BUDGET, rows_per_chunk

    rows = rows_per_chunk(100_000, 32000, 32000, 4, torch.device("cpu"))
    assert rows == CPU_CHUNK_BUDGET // (64000 * 4)
    assert rows_per_chunk(10, 32000, 32000, 4, torch.device("cpu")) == 10
    assert rows_per_chunk(100_000, 10**9, 10**9, 4, torch.device("cpu")) == 1
