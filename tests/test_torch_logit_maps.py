"""The torch backend's logit maps and student entropy (issue 22 items 2 and 4), called directly.

In float64, against the reference on mapped logits (`reference.mapped_logits`, gradients by autograd
through the map): every divergence and HPD, forward and backward (into a separate buffer and in
place into the student), `label_log_probs`, the entropy (`reference.student_entropy`), HPD's draw
from the mapped student, and a row whose gradient has a top column (q near 1) under a student map.
Then float32 accuracy at that top column, the compiled chunk math, and the vocabulary-parallel
backend on 2 gloo processes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from hpd_kernels import reference
from hpd_kernels.ops.common import map_logits
from hpd_kernels.ops.torch_backend import TORCH, compile_policy
from hpd_kernels.registry import DIVERGENCES, STAT_TOP_S, IDENTITY_MAPS, LogitMaps, mixture_logs

IGNORE, ROWS, VOCAB, EXTRA = -100, 12, 40, 3
MAPS = LogitMaps(student_scale=0.7, student_softcap=3.0, teacher_scale=1.3, teacher_softcap=0.0)
OTHER_MAPS = [LogitMaps(1.6, 0.0, 1.0, 2.5), LogitMaps(1.0, 4.0, 0.8, 0.0)]
OPTIONS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
TOP_ROW, EMPTY_ROW = 3, 6


def _problem(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(ROWS, VOCAB + EXTRA, generator=generator, dtype=torch.float64) * 2
    student[TOP_ROW] = -30.0
    student[TOP_ROW, 7] = 2.0        # mapped: -3 everywhere but 1.37 at column 7: q(7) > 1/2, a top column
    student[1, 4] = teacher[1, 4] = student[2, 9] = teacher[2, 9] = -math.inf   # absent tokens (shared: finite)
    student[EMPTY_ROW] = -math.inf                    # a row without a distribution
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[[0, 8]] = IGNORE
    return student.to(dtype), teacher.to(dtype), labels


def _mapped(logits, scale, softcap):
    return reference.mapped_logits(logits, scale=scale, softcap=softcap or None)


def _reference_pair(student, teacher, maps):
    leaf = student.detach().clone().requires_grad_(True)
    return leaf, _mapped(leaf, maps.student_scale, maps.student_softcap), \
        _mapped(teacher, maps.teacher_scale, maps.teacher_softcap)


def _row_scale(labels, seed=1):
    scale = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return torch.where(labels != IGNORE, scale, 0.0)


def _close(actual, expected, what, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _keep():
    keep = torch.ones(ROWS, dtype=torch.bool)
    keep[EMPTY_ROW] = False   # the reference has no rule for a row without a distribution
    return keep


def _check_divergence(name, maps, temperature, in_place=False):
    student, teacher, labels = _problem()
    _, log_mix_p, log_mix_q = mixture_logs(name, OPTIONS.get(name, {}).get("beta", 0.5),
                                           OPTIONS.get(name, {}).get("alpha", 0.1))
    scalars = dict(divergence=name, temperature=temperature, log_mix_p=log_mix_p, log_mix_q=log_mix_q)
    forward = TORCH.divergence_forward(student, teacher, labels, ignore_index=IGNORE, logit_maps=maps,
                                       with_entropy=True, **scalars)
    leaf, mapped_s, mapped_t = _reference_pair(student, teacher, maps)
    expected = reference.DIVERGENCE_LOSSES[name](mapped_s, mapped_t, labels, temperature=temperature,
                                                 reduction="none", **OPTIONS.get(name, {}))
    row_scale = _row_scale(labels)
    keep = _keep()
    (expected_grad,) = torch.autograd.grad((expected[keep] * row_scale[keep]).sum(), leaf)
    entropy = reference.student_entropy(mapped_s.detach(), mapped_t, temperature=temperature)
    _close(forward.loss[keep], expected.detach()[keep], f"{name} loss")
    _close(forward.entropy[keep], torch.where(labels != IGNORE, entropy, 0.0)[keep], f"{name} entropy")
    assert forward.loss[EMPTY_ROW] == 0 and forward.entropy[EMPTY_ROW] == 0
    grad = student.clone() if in_place else torch.full_like(student, math.nan)
    out = TORCH.divergence_backward(grad if in_place else student, teacher, forward.stats, row_scale, grad,
                                    logit_maps=maps, **scalars)
    _close(out[keep], expected_grad[keep], f"{name} grad", rtol=1e-9)
    assert (out[EMPTY_ROW] == 0).all()
    return forward


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_match_the_reference_on_mapped_logits(name):
    forward = _check_divergence(name, MAPS, 0.7)
    assert forward.stats[TOP_ROW, STAT_TOP_S] == 7, "the top-column path is not exercised"
    _check_divergence(name, MAPS, 1.0, in_place=True)


@pytest.mark.parametrize("maps", OTHER_MAPS)
def test_other_maps_and_in_place(maps):
    for name in ("forward_kl", "jsd", "tvd"):
        _check_divergence(name, maps, 1.3, in_place=True)
        _check_hybrid(maps, 1.3, in_place=True)


def _check_hybrid(maps, temperature, in_place=False, seed=4):
    student, teacher, labels = _problem(seed=seed)
    sampled = torch.randint(0, VOCAB, (ROWS,), generator=torch.Generator().manual_seed(seed))
    sampled[TOP_ROW] = 7
    weights = dict(fkl_weight=0.7, rkl_weight=1.2)
    forward = TORCH.hybrid_forward(student, teacher, labels, sampled, seed=None, temperature=temperature,
                                   ignore_index=IGNORE, logit_maps=maps, with_entropy=True, **weights)
    leaf, mapped_s, mapped_t = _reference_pair(student, teacher, maps)
    expected = reference.hybrid_kl_loss(mapped_s, mapped_t, labels, sampled, temperature=temperature,
                                        reduction="none", **weights)
    keep, row_scale = _keep(), _row_scale(labels)
    (expected_grad,) = torch.autograd.grad((expected[keep] * row_scale[keep]).sum(), leaf)
    entropy = reference.student_entropy(mapped_s.detach(), mapped_t, temperature=temperature)
    _close(forward.loss[keep], expected.detach()[keep], "hpd loss")
    _close(forward.entropy[keep], torch.where(labels != IGNORE, entropy, 0.0)[keep], "hpd entropy")
    assert forward.loss[EMPTY_ROW] == 0 and forward.entropy[EMPTY_ROW] == 0
    grad = student.clone() if in_place else torch.full_like(student, math.nan)
    out = TORCH.hybrid_backward(grad if in_place else student, labels, sampled, forward.stats, row_scale, grad,
                                vocab=VOCAB, temperature=temperature, logit_maps=maps)
    _close(out[keep], expected_grad[keep], "hpd grad", rtol=1e-9)
    assert (out[EMPTY_ROW] == 0).all()
    log_q = torch.log_softmax(mapped_s.detach() / temperature, dim=-1)
    safe = torch.where(labels != IGNORE, labels, 0)
    label_log_q = TORCH.label_log_probs(student, safe, forward.stats, temperature, maps)
    counted = keep & (labels != IGNORE)   # the caller masks the others
    _close(label_log_q[counted], log_q.gather(1, safe[:, None])[:, 0][counted], "label_log_probs")
    return forward


def test_hybrid_matches_the_reference_on_mapped_logits():
    forward = _check_hybrid(MAPS, 0.7)
    assert forward.stats[TOP_ROW, STAT_TOP_S] == 7, "the top-column path is not exercised"
    _check_hybrid(MAPS, 1.0, in_place=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hpd_draws_from_the_mapped_student(dtype):
    student, teacher, labels = _problem(dtype)
    common = dict(seed=11, temperature=0.8, fkl_weight=1.0, rkl_weight=1.0, ignore_index=IGNORE)
    acc = torch.float32 if dtype == torch.float32 else torch.float64
    mapped_s = map_logits(student.to(acc), MAPS.student_scale, MAPS.student_softcap)
    mapped_t = map_logits(teacher.to(acc), MAPS.teacher_scale, MAPS.teacher_softcap)
    drawn = TORCH.hybrid_forward(student, teacher, labels, None, logit_maps=MAPS, **common).sampled_ids
    expected = TORCH.hybrid_forward(mapped_s, mapped_t, labels, None, **common).sampled_ids
    assert torch.equal(drawn, expected)
    unmapped = TORCH.hybrid_forward(student, teacher, labels, None, **common).sampled_ids
    assert not torch.equal(drawn, unmapped)   # the check has power


def test_identity_maps_and_no_entropy_change_nothing():
    student, teacher, labels = _problem(torch.float32)
    scalars = dict(divergence="jsd", temperature=0.7, log_mix_p=math.log(0.3), log_mix_q=math.log(0.7))
    plain = TORCH.divergence_forward(student, teacher, labels, ignore_index=IGNORE, **scalars)
    explicit = TORCH.divergence_forward(student, teacher, labels, ignore_index=IGNORE, logit_maps=LogitMaps(),
                                        with_entropy=True, **scalars)
    assert plain.entropy is None
    for ours, theirs in ((plain.loss, explicit.loss), (plain.stats, explicit.stats)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    row_scale = _row_scale(labels).float()
    grads = [TORCH.divergence_backward(student, teacher, plain.stats, row_scale, torch.empty_like(student),
                                       logit_maps=maps, **scalars) for maps in (IDENTITY_MAPS, LogitMaps())]
    torch.testing.assert_close(*grads, rtol=0, atol=0, equal_nan=True)


def test_float32_top_column_is_accurate_under_a_student_map():
    """q(top) near 1 under a soft cap well above the logits: `w - q W` would cancel at the top column;
    taken from the others (before the slope), it stays at float32's relative accuracy."""
    maps = LogitMaps(0.9, 30.0, 1.0, 0.0)
    student, teacher, labels = _problem()
    student[TOP_ROW, 7] = 25.0
    teacher[TOP_ROW] = -30.0
    teacher[TOP_ROW, 7] = 18.0
    for name in ("forward_kl", "reverse_kl", "jsd"):
        _, log_mix_p, log_mix_q = mixture_logs(name, 0.3, 0.1)
        scalars = dict(divergence=name, temperature=1.0, log_mix_p=log_mix_p, log_mix_q=log_mix_q)
        row_scale = _row_scale(labels)
        grads = []
        for dtype in (torch.float32, torch.float64):
            s, t = student.to(dtype), teacher.to(dtype)
            forward = TORCH.divergence_forward(s, t, labels, ignore_index=IGNORE, logit_maps=maps, **scalars)
            assert forward.stats[TOP_ROW, STAT_TOP_S] == 7
            grads.append(TORCH.divergence_backward(s, t, forward.stats, row_scale.to(dtype), torch.empty_like(s),
                                                   logit_maps=maps, **scalars)[TOP_ROW, 7].double())
        assert grads[1] != 0
        assert abs(grads[0] - grads[1]) <= 1e-5 * abs(grads[1]), (name, grads)


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.3, 2.0), softcap=st.sampled_from([0.0, 1.5, 5.0]), teacher_scale=st.floats(0.5, 1.5),
       temperature=st.sampled_from([0.6, 1.0, 2.0]))
def test_random_maps_forward_kl_and_hpd(scale, softcap, teacher_scale, temperature):
    maps = LogitMaps(scale, softcap, teacher_scale, 2.0)
    _check_divergence("reverse_kl", maps, temperature)
    _check_hybrid(maps, temperature)


def test_compiled_chunk_math_takes_the_maps(monkeypatch):
    """The compiled chunk functions get the maps (and the entropy flag) as arguments: the same numbers
    as eager, for a divergence and HPD (its draw stays eager: the same tokens)."""
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv(compile_policy.COMPILE_ENV, setting)
        student, teacher, labels = _problem(torch.float32)
        row_scale = _row_scale(labels).float()
        scalars = dict(divergence="jsd", temperature=0.7, log_mix_p=math.log(0.3), log_mix_q=math.log(0.7))
        forward = TORCH.divergence_forward(student, teacher, labels, ignore_index=IGNORE, logit_maps=MAPS,
                                           with_entropy=True, **scalars)
        grad = TORCH.divergence_backward(student, teacher, forward.stats, row_scale, torch.empty_like(student),
                                         logit_maps=MAPS, **scalars)
        hybrid = TORCH.hybrid_forward(student, teacher, labels, None, seed=2, temperature=0.7, fkl_weight=1.0,
                                      rkl_weight=1.0, ignore_index=IGNORE, logit_maps=MAPS, with_entropy=True)
        hybrid_grad = TORCH.hybrid_backward(student.clone(), labels, hybrid.sampled_ids, hybrid.stats, row_scale,
                                            torch.empty_like(student), vocab=VOCAB, temperature=0.7, logit_maps=MAPS)
        results.append((forward.loss, forward.entropy, grad, hybrid.loss, hybrid.entropy, hybrid_grad,
                        hybrid.sampled_ids))
    assert not compile_policy.CompiledChunkMath.failed
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=2e-5, atol=1e-6)


def _vocab_parallel_worker(rank, init_file):
    from hpd_kernels.ops.vocab_parallel import VocabParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    student, teacher, labels = _problem()
    teacher = teacher[:, :VOCAB]
    split = 23
    part = slice(0, split) if rank == 0 else slice(split, VOCAB)
    backend = VocabParallel(dist.group.WORLD, part.start, VOCAB)
    row_scale = _row_scale(labels)
    scalars = dict(divergence="skew_reverse_kl", temperature=0.7, log_mix_p=math.log(0.2), log_mix_q=math.log(0.8))
    for whole, mine in ((TORCH, backend),):
        expected = whole.divergence_forward(student, teacher, labels, ignore_index=IGNORE, logit_maps=MAPS,
                                            with_entropy=True, **scalars)
        ours = mine.divergence_forward(student[:, part], teacher[:, part], labels, ignore_index=IGNORE,
                                       logit_maps=MAPS, with_entropy=True, **scalars)
        _close(ours.loss, expected.loss, "vocab-parallel loss")
        _close(ours.entropy, expected.entropy, "vocab-parallel entropy")
        grad = mine.divergence_backward(student[:, part].clone(), teacher[:, part], ours.stats, row_scale,
                                        torch.empty_like(student[:, part]), logit_maps=MAPS, **scalars)
        expected_grad = whole.divergence_backward(student, teacher, expected.stats, row_scale,
                                                  torch.empty_like(student), logit_maps=MAPS, **scalars)
        _close(grad, expected_grad[:, part], "vocab-parallel grad")
        hpd = dict(seed=5, temperature=0.7, fkl_weight=0.7, rkl_weight=1.0, ignore_index=IGNORE, logit_maps=MAPS,
                   with_entropy=True)
        expected = whole.hybrid_forward(student, teacher, labels, None, **hpd)
        ours = mine.hybrid_forward(student[:, part], teacher[:, part], labels, None, **hpd)
        assert torch.equal(ours.sampled_ids, expected.sampled_ids)
        _close(ours.loss, expected.loss, "vocab-parallel hpd loss")
        _close(ours.entropy, expected.entropy, "vocab-parallel hpd entropy")
        grad = mine.hybrid_backward(student[:, part], labels, ours.sampled_ids, ours.stats, row_scale,
                                    torch.empty_like(student[:, part]), vocab=VOCAB, temperature=0.7, logit_maps=MAPS)
        expected_grad = whole.hybrid_backward(student, labels, expected.sampled_ids, expected.stats, row_scale,
                                              torch.empty_like(student), vocab=VOCAB, temperature=0.7,
                                              logit_maps=MAPS)
        _close(grad, expected_grad[:, part], "vocab-parallel hpd grad")
    dist.barrier()
    dist.destroy_process_group()


def test_vocab_parallel_maps_and_entropy(tmp_path):
    mp.spawn(_vocab_parallel_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)
