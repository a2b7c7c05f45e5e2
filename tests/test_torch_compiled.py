"""The torch backend's compiled chunk math (`torch.compile` of its per-chunk functions) against its
eager twin and the float64 reference.

The property tests run problems smaller than `COMPILE_MIN_ELEMENTS`, hence the eager math; here
`HPD_KERNELS_TORCH_COMPILE=1` compiles at every size, so the compiled code meets the same cases: every
objective, fully `-inf` rows, ignored rows, a temperature, float32 and float64, HPD's draws (which
stay eager, so they must be identical), the fused-linear path (whose gradient overwrites the chunk's
own logits) and the fallback to eager when compiling fails.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hpd_kernels
from hpd_kernels import reference
from hpd_kernels.ops.torch_backend import TORCH, compile_policy, row_spans
from hpd_kernels.registry import DIVERGENCES, OBJECTIVES

IGNORE = -100


def _problem(dtype, rows=48, vocab=700):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = student + torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    student[5], teacher[5] = -math.inf, -math.inf    # a fully -inf row: 0, and no gradient
    student[9, :300], teacher[9, :300] = -math.inf, -math.inf  # a shared mask
    student[11, 3] = 40.0                             # a row with q(top) near 1
    labels = torch.randint(300, vocab, (rows,), generator=generator)
    labels[[2, 17]] = IGNORE
    return student.to(dtype), teacher.to(dtype), labels


def _loss(objective, student, teacher, labels, **options):
    if objective == "hpd":
        loss, details = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=3, temperature=1.5,
                                                   backend="torch", return_details=True, **options)
        return loss, details.sampled_ids
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, temperature=1.5, backend="torch",
                                                    **options), None


def _run(objective, dtype, setting, monkeypatch):
    monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
    student, teacher, labels = _problem(dtype)
    student.requires_grad_(True)
    loss, drawn = _loss(objective, student, teacher, labels)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad, drawn


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_matches_eager(objective, dtype, monkeypatch):
    loss_c, grad_c, drawn_c = _run(objective, dtype, "1", monkeypatch)
    loss_e, grad_e, drawn_e = _run(objective, dtype, "0", monkeypatch)
    tolerance = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss_c, loss_e, **tolerance)
    torch.testing.assert_close(grad_c, grad_e, **tolerance)
    assert torch.all(grad_c[5] == 0)
    if drawn_c is not None:
        assert torch.equal(drawn_c, drawn_e)


@pytest.mark.parametrize("objective", DIVERGENCES)
def test_compiled_float64_matches_reference(objective, monkeypatch):
    monkeypatch.setenv(compile_policy.COMPILE_ENV, "1")
    student, teacher, labels = _problem(torch.float64)
    keep = torch.ones(student.shape[0], dtype=torch.bool)
    keep[[5, 9]] = False  # the reference has no rule for fully -inf rows; shared masks: drop both
    student, teacher, labels = student[keep].requires_grad_(True), teacher[keep], labels[keep]
    ours, _ = _loss(objective, student, teacher, labels)
    ours_grad = torch.autograd.grad(ours, student)[0]
    ref = reference.DIVERGENCE_LOSSES[objective](student, teacher, labels, temperature=1.5, ignore_index=IGNORE)
    ref_grad = torch.autograd.grad(ref, student)[0]
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["hpd", "jsd"])
def test_compiled_fused_linear_matches_eager(objective, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(200, 32, generator=generator)
    weight = torch.randn(900, 32, generator=generator) / 4
    teacher_hidden = torch.randn(200, 48, generator=generator)
    teacher_weight = torch.randn(900, 48, generator=generator) / 4
    labels = torch.randint(0, 900, (200,), generator=generator)
    labels[:10] = IGNORE
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
        leaves = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
        if objective == "hpd":
            loss = hpd_kernels.fused_linear_hybrid_kl_loss(*leaves, teacher_hidden, teacher_weight, labels, seed=1,
                                                           backend="torch", chunk_size=64)
        else:
            loss = hpd_kernels.fused_linear_divergence_loss(*leaves, teacher_hidden, teacher_weight, labels,
                                                            divergence=objective, backend="torch", chunk_size=64)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=2e-5, atol=1e-7)


def test_failed_compile_falls_back_to_eager_once(monkeypatch):
    monkeypatch.setenv(compile_policy.COMPILE_ENV, "1")
    student, teacher, labels = _problem(torch.float32)
    expected = hpd_kernels.forward_kl_loss(student, teacher, labels, backend="torch")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compile_policy.CompiledChunkMath, "failed", False)
    compiled_fns = compile_policy.CompiledChunkMath.every
    for fn in compiled_fns:
        monkeypatch.setattr(fn, "compiled", None)
    with pytest.warns(RuntimeWarning, match="torch.compile of the torch backend"):
        first = hpd_kernels.forward_kl_loss(student, teacher, labels, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = hpd_kernels.forward_kl_loss(student, teacher, labels, backend="torch")
    assert compile_policy.CompiledChunkMath.failed
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_auto_runs_eagerly_first_then_compiles(monkeypatch):
    """"auto": compile-sized problems run eagerly until `COMPILE_AFTER_ELEMENTS` of them have, then
    through `torch.compile`; the switch point is counted in logits, so it is the same on every run."""
    monkeypatch.setenv(compile_policy.COMPILE_ENV, "auto")
    student, teacher, labels = _problem(torch.float32)
    elements = student.shape[0] * student.shape[1]
    monkeypatch.setattr(compile_policy, "COMPILE_MIN_ELEMENTS", elements)
    monkeypatch.setattr(compile_policy, "COMPILE_AFTER_ELEMENTS", 3 * elements)  # a forward and a backward: one step
    monkeypatch.setattr(compile_policy._EagerWork, "elements", 0)
    monkeypatch.setattr(compile_policy.CompiledChunkMath, "failed", False)
    compiled_calls = []

    def spy_compile(fn, **options):  # the policy, not inductor: record each compiled call, run it eagerly
        def run(*args):
            compiled_calls.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", spy_compile)
    for fn in compile_policy.CompiledChunkMath.every:
        monkeypatch.setattr(fn, "compiled", None)

    def step():
        leaf = student.clone().requires_grad_(True)
        loss = hpd_kernels.forward_kl_loss(leaf, teacher, labels, backend="torch")
        return loss.detach(), torch.autograd.grad(loss, leaf)[0]

    assert not compile_policy.eager_phase_over()
    first = step()
    assert compiled_calls == [] and compile_policy.eager_elements() == 2 * elements
    assert not compile_policy.eager_phase_over()
    second = step()  # its forward still eager (2 < 3), which ends the phase; its backward compiled
    assert compiled_calls == ["_divergence_chunk_backward"] and compile_policy.eager_phase_over()
    third = step()
    assert compiled_calls[1:] == ["_divergence_chunk_forward", "_divergence_chunk_backward"]
    assert compile_policy.eager_elements() == 3 * elements
    for result in (second, third):  # the spy runs the same functions: identical numbers
        torch.testing.assert_close(result, first, rtol=0, atol=0)
    # Problems below the compile size never count and never compile.
    small = hpd_kernels.forward_kl_loss(student[:4], teacher[:4], labels[:4], backend="torch")
    assert torch.isfinite(small) and len(compiled_calls) == 3 and compile_policy.eager_elements() == 3 * elements


@pytest.mark.parametrize("setting", ["0", "1"])
def test_top_column_only_where_it_can_cancel(setting, monkeypatch):
    """The torch backend names a top column (`STAT_TOP_S`) only where q there exceeds 1/2: the
    student's first argmax of `s / T`, in a tie too; elsewhere -1, and no sums in the backward."""
    monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
    student = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    student[1, 7] = student[1, 30] = 40.0    # q(top) near 1/2 each: a tie, neither above 1/2
    student[2, 9] = student[2, 44] = 40.0
    student[2, 44] = 39.0                    # q(9) above 1/2
    student[3, 12] = 25.0                    # q(12) near 1
    student[4, 3] = 2.0 * math.log(50.0)     # q(3) near 1/2 at T = 2: the boundary, decided by q itself
    teacher = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    stats = TORCH.divergence_forward(student, teacher, None, divergence="forward_kl", temperature=2.0,
                                     log_mix_p=0.0, log_mix_q=0.0, ignore_index=IGNORE).stats
    q = torch.softmax(student.double() / 2.0, dim=-1)
    expected = torch.where(q.max(dim=-1).values > 0.5, (student / 2.0).argmax(dim=-1).double(), -1.0)
    assert torch.equal(stats[:, 2].double(), expected)
    assert stats[2, 2] == 9 and stats[3, 2] == 12 and stats[1, 2] == -1


def _prompted_rows(seed, rows=90, vocab=300):
    """Float64 student and teacher logits and labels with prompt-like runs of ignored rows: 20 at
    the start, 17 in the middle, and a short gap of 5 that is computed with its neighbours."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = student.detach() + torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[:20] = IGNORE
    labels[40:57] = IGNORE
    labels[70:75] = IGNORE
    return student, teacher, labels


def _nan_filled_empty_like(monkeypatch):
    """"empty" promises nothing: make it NaN, so that rows a pass skips must still be written."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda tensor, **options: empty_like(tensor, **options).fill_(math.nan))


@pytest.mark.parametrize("setting", ["0", "1"])
@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])
def test_runs_of_rows_outside_the_loss_are_skipped_and_get_zero_gradient(objective, setting, monkeypatch):
    """Prompt-like runs of ignored rows (at least `SKIP_MIN_ROWS`) are left out of the chunks, as the
    kernels leave them out; the gradient buffer there (uninitialised) must still come back 0, and
    the loss, its hard-label part and the gradient elsewhere are the reference's."""
    monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
    student, teacher, labels = _prompted_rows(5)
    assert row_spans.SKIP_MIN_ROWS <= 17
    _nan_filled_empty_like(monkeypatch)
    ours = hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, temperature=1.5, backend="torch",
                                                    ce_weight=0.3)
    ours_grad = torch.autograd.grad(ours, student)[0]
    ref = reference.DIVERGENCE_LOSSES[objective](student, teacher, labels, temperature=1.5, ignore_index=IGNORE)
    ref = ref + 0.3 * reference.sft_loss(student, labels, temperature=1.5, ignore_index=IGNORE)
    ref_grad = torch.autograd.grad(ref, student)[0]
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(ours_grad[:20] == 0) and torch.all(ours_grad[40:57] == 0)
    assert row_spans.live_spans(labels != IGNORE) == [(20, 40), (57, 90)]


@pytest.mark.parametrize("setting", ["0", "1"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_hpd_skips_runs_of_rows_outside_the_loss_as_the_divergences_do(setting, ce_weight, monkeypatch):
    """HPD's forward and backward leave out the same prompt-like runs: the draws (keyed by row),
    the loss and the gradient are those of a pass over every row, and the skipped gradient rows of
    an uninitialised (NaN-filled) buffer come back 0."""
    monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
    student, teacher, labels = _prompted_rows(6)
    rows = student.shape[0]
    options = dict(temperature=1.5, seed=11, backend="torch", ce_weight=ce_weight, return_details=True)

    def loss_and_grad():
        loss, details = hpd_kernels.hybrid_kl_loss(student, teacher, labels, **options)
        return loss.detach(), details.sampled_ids, torch.autograd.grad(loss, student)[0]

    with monkeypatch.context() as patch:
        patch.setattr(row_spans, "SKIP_MIN_ROWS", rows + 1)  # nothing skipped
        assert row_spans.live_spans(labels != IGNORE) == [(20, 90)]
        expected = loss_and_grad()
    _nan_filled_empty_like(monkeypatch)
    ours = loss_and_grad()
    assert torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(ours[2], expected[2], rtol=1e-13, atol=0)
    assert torch.all(ours[2][:20] == 0) and torch.all(ours[2][40:57] == 0)
