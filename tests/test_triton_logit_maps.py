"""The Triton backend's logit maps (`registry.LogitMaps`) and student entropy (issue 22 items 2 and 4),
called directly (`ops.triton.backend.TRITON`) against the reference on mapped logits: loss, the
gradient by autograd through `reference.mapped_logits`, the entropy, the hard-label term and HPD's
draw; the kernels' own tanh against torch's. Small problems: the interpreter runs them on the CPU."""

import math

import pytest
import torch

pytest.importorskip("triton")

from hpd_kernels import reference  # noqa: E402
from hpd_kernels.ops.common import map_logits  # noqa: E402
from hpd_kernels.ops.triton import utils as triton_utils  # noqa: E402
from hpd_kernels.registry import DIVERGENCES, IDENTITY_MAPS, LogitMaps, mixture_logs  # noqa: E402

if not triton_utils.interpreter_enabled():
    pytest.skip("runs the kernels under TRITON_INTERPRET=1", allow_module_level=True)

from hpd_kernels.ops.triton.backend import TRITON  # noqa: E402

ROWS, VOCAB, TEACHER_VOCAB, TEMPERATURE = 12, 37, 41, 0.7
MIXTURE = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
MAPS = (LogitMaps(0.7, 3.0, 1.3, 0.0), LogitMaps(1.0, 0.0, 0.8, 2.5))


def _problem():
    generator = torch.Generator().manual_seed(22)
    student = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(ROWS, TEACHER_VOCAB, generator=generator, dtype=torch.float64) * 3
    student[1, 5] = teacher[1, 5] = -math.inf  # a masked column (finite divergences: both sides)
    student[4, 2] = 9.0
    student[5] = -math.inf  # a row without a distribution: loss, gradient and entropy 0
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[0] = labels[3] = -100
    return student, teacher, labels


def _mapped(logits, scale, softcap):
    return reference.mapped_logits(logits, scale=scale, softcap=softcap or None)


def _run(objective, maps, dtype, sampled_ids=None):
    """The backend's loss, gradient, entropy, label log-probabilities and y_hat, and the reference's in float64."""
    student, teacher, labels = _problem()
    s, t = student.to(dtype), teacher.to(dtype)
    leaf = student.clone().requires_grad_(True)
    mapped_s = _mapped(leaf, maps.student_scale, maps.student_softcap)
    mapped_t = _mapped(teacher, maps.teacher_scale, maps.teacher_softcap)
    active = labels != -100
    if objective == "hpd":
        forward = TRITON.hybrid_forward(s, t, labels, sampled_ids, seed=3, temperature=TEMPERATURE, fkl_weight=1.0,
                                        rkl_weight=0.5, ignore_index=-100, logit_maps=maps, with_entropy=True)
        expected = reference.hybrid_kl_loss(mapped_s, mapped_t, labels, forward.sampled_ids, fkl_weight=1.0,
                                            rkl_weight=0.5, temperature=TEMPERATURE, reduction="none")
    else:
        options = MIXTURE.get(objective, {})
        name, log_mix_p, log_mix_q = mixture_logs(objective, options.get("beta", 0.5), options.get("alpha", 0.1))
        kwargs = dict(divergence=name, temperature=TEMPERATURE, log_mix_p=log_mix_p, log_mix_q=log_mix_q)
        forward = TRITON.divergence_forward(s, t, labels, ignore_index=-100, logit_maps=maps, with_entropy=True,
                                            **kwargs)
        expected = reference.DIVERGENCE_LOSSES[objective](mapped_s, mapped_t, labels, temperature=TEMPERATURE,
                                                          reduction="none", **options)
    undefined = torch.isnan(expected)  # rows without a distribution: 0 and no gradient in the backends
    expected = torch.where(undefined, 0.0, expected)
    row_scale = torch.linspace(0.5, 1.5, ROWS, dtype=forward.loss.dtype) * active
    grad = torch.empty_like(s)
    if objective == "hpd":
        TRITON.hybrid_backward(s, labels, forward.sampled_ids, forward.stats, row_scale, grad, vocab=VOCAB,
                               temperature=TEMPERATURE, logit_maps=maps)
    else:
        TRITON.divergence_backward(s, t, forward.stats, row_scale, grad, logit_maps=maps, **kwargs)
    (expected_grad,) = torch.autograd.grad((expected * row_scale.double()).sum(), leaf)
    expected_grad = torch.where(undefined[:, None], 0.0, expected_grad)
    entropy = reference.student_entropy(mapped_s.detach(), mapped_t, temperature=TEMPERATURE)
    entropy = torch.where(active & torch.isfinite(entropy), entropy, 0.0)
    log_q = torch.log_softmax(mapped_s.detach()[:, :VOCAB] / TEMPERATURE, dim=-1)
    label_log_q = log_q.gather(1, labels.clamp(0)[:, None])[:, 0]
    usable = active & torch.isfinite(label_log_q)
    label_log_probs = TRITON.label_log_probs(s, labels, forward.stats, TEMPERATURE, logit_maps=maps)
    return dict(loss=(forward.loss, expected.detach()), grad=(grad, expected_grad),
                entropy=(forward.entropy, entropy), label=(label_log_probs[usable], label_log_q[usable]))


@pytest.mark.parametrize("block_v", (4096, 16), ids=("one-tile", "three-tiles"))
@pytest.mark.parametrize("maps", MAPS, ids=("student-cap", "teacher-cap"))
@pytest.mark.parametrize("objective", DIVERGENCES + ("hpd",))
def test_float64_matches_the_reference_on_mapped_logits(objective, maps, block_v, monkeypatch):
    monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", block_v)  # the online sums across tiles
    for name, (got, expected) in _run(objective, maps, torch.float64).items():
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("objective", ("forward_kl", "jsd", "hpd"))
def test_float32_is_as_accurate_as_float32(objective):
    maps = MAPS[0]
    for name, (got, expected) in _run(objective, maps, torch.float32).items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=3e-5, atol=2e-6 * scale, msg=lambda m: f"{name}: {m}")


def test_the_draw_is_from_the_mapped_student():
    student, teacher, labels = _problem()
    maps = MAPS[0]
    mapped = TRITON.hybrid_forward(student, teacher, labels, None, seed=5, temperature=TEMPERATURE, fkl_weight=1.0,
                                   rkl_weight=1.0, ignore_index=-100, logit_maps=maps)
    premapped = TRITON.hybrid_forward(map_logits(student, maps.student_scale, maps.student_softcap),
                                      map_logits(teacher, maps.teacher_scale, maps.teacher_softcap), labels, None,
                                      seed=5, temperature=TEMPERATURE, fkl_weight=1.0, rkl_weight=1.0,
                                      ignore_index=-100)
    assert torch.equal(mapped.sampled_ids, premapped.sampled_ids)
    torch.testing.assert_close(mapped.loss, premapped.loss, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("objective", ("reverse_kl", "tvd", "hpd"))
def test_the_entropy_changes_no_other_bit(objective, monkeypatch):
    monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", 16)
    student, teacher, labels = _problem()
    student = student.float()
    teacher = teacher.float()
    results = []
    for with_entropy in (False, True):
        if objective == "hpd":
            forward = TRITON.hybrid_forward(student, teacher, labels, None, seed=1, temperature=TEMPERATURE,
                                            fkl_weight=1.0, rkl_weight=1.0, ignore_index=-100,
                                            logit_maps=IDENTITY_MAPS, with_entropy=with_entropy)
        else:
            forward = TRITON.divergence_forward(student, teacher, labels, divergence=objective,
                                                temperature=TEMPERATURE, log_mix_p=0.0, log_mix_q=0.0,
                                                ignore_index=-100, with_entropy=with_entropy)
        assert (forward.entropy is None) != with_entropy
        results.append(forward)
    active = labels != -100  # the stats of other rows are left unwritten
    assert torch.equal(results[0].loss, results[1].loss)
    torch.testing.assert_close(results[0].stats[active], results[1].stats[active], rtol=0, atol=0, equal_nan=True)
    expected = reference.student_entropy(student.double(), teacher.double(), temperature=TEMPERATURE)
    expected = torch.where((labels != -100) & torch.isfinite(expected), expected, 0.0)
    torch.testing.assert_close(results[1].entropy.double(), expected, rtol=2e-6, atol=1e-6)


def _kernel_tanh():
    tl, triton = triton_utils.tl, triton_utils.triton

    @triton.jit
    def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n)
        tl.store(out_ptr + offsets, triton_utils.tanh(x), mask=offsets < n)

    def tanh(x):
        out = torch.empty_like(x)
        kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
        return out

    return tanh


@pytest.mark.parametrize("dtype,bound", ((torch.float32, 2.5), (torch.float64, 1e-15)))
def test_tanh_is_accurate_everywhere(dtype, bound):
    magnitudes = torch.cat([torch.logspace(-30, 1.5, 2000, dtype=torch.float64), torch.linspace(0.5, 0.75, 500,
                                                                                               dtype=torch.float64)])
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, math.inf, -math.inf], dtype=torch.float64)]).to(dtype)
    got = _kernel_tanh()(x)
    exact = torch.tanh(x.double())
    if dtype == torch.float32:  # in units in the last place of the float32 result
        ulp = (torch.nextafter(exact.float().abs(), torch.tensor(math.inf)) - exact.float().abs()).double()
        error = ((got.double() - exact).abs() / ulp.clamp_min(1e-45)).max().item()
    else:
        error = ((got - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
    assert error <= bound, error
