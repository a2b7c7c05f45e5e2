"""In-kernel sampling of y_hat (Gumbel-max over counter-based noise): exact in distribution,
reproducible from the seed, identical across backends and tile widths."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import hpd_kernels
from hpd_kernels.ops import gumbel
from hpd_kernels.ops.triton import utils as triton_utils
from hpd_kernels.ops.gumbel import GUMBEL2_MAX
from hpd_kernels.ops.triton.gumbel import gumbel2_from_bits


@triton.jit
def _noise_from_bits(bits_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, gumbel2_from_bits(tl.load(bits_ptr + offsets).to(tl.uint32)))

BACKENDS = ("torch", "triton")


def _draw(logits_row, n_draws, seed, backend, temperature=1.0, dtype=torch.float32):
    """y_hat for `n_draws` copies of one row: rows have distinct counters, so draws are independent."""
    student = logits_row.to(dtype).expand(n_draws, -1).contiguous()
    labels = torch.zeros(n_draws, dtype=torch.long)
    details = hpd_kernels.hpd_token_weights(student, student, labels, seed=seed, temperature=temperature,
                                            backend=backend)
    return details.sampled_ids


def _chi_square_p(samples, probs):
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_follow_softmax(backend):
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -math.inf, 1.5])  # 7: not a power of two
    temperature = 1.3
    samples = _draw(logits, 12000, seed=1234, backend=backend, temperature=temperature)
    probs = torch.softmax(logits.double() / temperature, dim=0)
    # Fixed seed, so the outcome is deterministic; p > 1e-3 is what a correct sampler gives with
    # probability 0.999, and the next test shows the same data rejects a nearby wrong answer.
    assert _chi_square_p(samples, probs) > 1e-3
    wrong = torch.softmax(logits.double() / 1.0, dim=0)  # temperature ignored
    assert _chi_square_p(samples, wrong) < 1e-6


def test_samples_follow_softmax_across_many_tiles(monkeypatch):
    monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", 16)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, generator=generator) * 1.5
    logits[[3, 20, 36]] = -math.inf
    samples = _draw(logits, 8000, seed=99, backend="triton")
    assert _chi_square_p(samples, torch.softmax(logits.double(), dim=0)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_samples_different_seed_different_samples(backend):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(64, 50, generator=generator)
    teacher = torch.randn(64, 50, generator=generator)
    labels = torch.randint(0, 50, (64,), generator=generator)
    draw = lambda seed: hpd_kernels.hpd_token_weights(student, teacher, labels, seed=seed, backend=backend).sampled_ids
    assert torch.equal(draw(7), draw(7))
    # Rows are near-uniform over 50 tokens: two independent draws agree on ~1/50 of rows.
    assert (draw(7) != draw(8)).float().mean() > 0.8
    assert (draw(7) != draw(7 + 2**32)).float().mean() > 0.8  # seeds are not truncated to 32 bits


def test_backends_and_tile_widths_draw_the_same_token(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 17, 300, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 17, 310, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 300, (3, 17), generator=generator)
    labels[0, :4] = -100
    run = lambda backend: hpd_kernels.hpd_token_weights(student, teacher, labels, seed=5, temperature=0.7,
                                                       backend=backend).sampled_ids
    reference_ids = run("torch")
    assert torch.equal(reference_ids[0, :4], torch.full((4,), -100))  # inactive rows report ignore_index
    for block in (16, 128, 4096):
        monkeypatch.setattr(triton_utils, "MAX_BLOCK_V", block)
        assert torch.equal(run("triton"), reference_ids)


def test_unseeded_calls_follow_torch_manual_seed():
    student = torch.randn(20, 30)
    labels = torch.randint(0, 30, (20,))
    torch.manual_seed(3)
    first = hpd_kernels.hpd_token_weights(student, student, labels, backend="torch").sampled_ids
    torch.manual_seed(3)
    again = hpd_kernels.hpd_token_weights(student, student, labels, backend="torch").sampled_ids
    assert torch.equal(first, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_details_report_weights_and_mismatch_rate(backend):
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(30, 40, generator=generator, dtype=torch.float64)
    teacher = torch.randn(30, 40, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 40, (30,), generator=generator)
    labels[:6] = -100
    loss, details = hpd_kernels.hybrid_kl_loss(student, teacher, labels, seed=11, backend=backend,
                                               return_details=True)
    active = labels != -100
    expected_rate = (details.sampled_ids[active] != labels[active]).double().mean()
    assert details.mismatch_rate.item() == pytest.approx(expected_rate.item())
    from hpd_kernels import reference
    w_y, w_hat = reference.hpd_weights(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                       labels, details.sampled_ids.clamp(min=0))
    torch.testing.assert_close(details.label_weight[active], w_y[active], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(details.sample_weight[active], w_hat[active], rtol=1e-10, atol=1e-12)
    assert (details.label_weight[~active] == 0).all() and (details.sample_weight[~active] == 0).all()
    expected = reference.hybrid_kl_loss(student, teacher, labels, details.sampled_ids.clamp(min=0))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_noise_is_finite_at_the_extreme_hash_values():
    """All 2^32 hash values map to a finite base-2 Gumbel in [-4.59, 23.48] (under the tile skip's
    bound GUMBEL2_MAX), identically on every path.

    (Built from the top 24 bits, `k + 1/2` rounds up to 2^24 in float32 at the largest k, giving
    u = 1 and an infinite noise that would win the argmax whatever the logits.)"""
    extremes = np.array([0, 1, 511, 512, 2**31 - 1, 2**31, 2**32 - 512, 2**32 - 1], dtype=np.uint32)
    from_numpy = torch.from_numpy(gumbel.gumbel2_from_bits_numpy(extremes.copy()))
    from_torch = gumbel.gumbel2_from_bits_torch(torch.from_numpy(extremes.view(np.int32).copy()))

    from_triton = torch.empty(len(extremes))
    _noise_from_bits[(1,)](torch.from_numpy(extremes.astype(np.int64)), from_triton, N=len(extremes))
    for noise in (from_numpy, from_torch, from_triton):
        assert torch.isfinite(noise).all() and noise.min() > -4.59 and noise.max() < 23.48, noise
        assert noise.max() <= GUMBEL2_MAX
    # The largest hash gives the largest noise: the skip bound is tight to within 0.03.
    assert from_numpy.max() == from_numpy[-1] and GUMBEL2_MAX - from_numpy[-1] < 0.03
    # The same bits on every path; `log2` itself may differ in the last ulp between libraries.
    torch.testing.assert_close(from_torch, from_numpy, rtol=1e-6, atol=0)
    torch.testing.assert_close(from_triton, from_numpy, rtol=1e-6, atol=0)


def test_cpu_noise_in_threaded_blocks_is_the_noise_of_the_whole_array(monkeypatch):
    """The CPU path splits rows into blocks over threads; every element must get the bits it gets
    computed in one piece (37 rows: blocks of 8 and a ragged last one), which the Triton kernel's
    draws pin (`test_backends_and_tile_widths_draw_the_same_token`)."""
    rows, columns = torch.arange(100, 137), torch.arange(5000, 6021)
    keys = gumbel.row_keys_torch(gumbel.seed_key(11), rows)
    column_bits = columns.numpy().astype(np.uint32) * np.uint32(gumbel._COLUMN_MUL)
    expected = torch.from_numpy(gumbel._gumbel2_numpy_block(keys.numpy().astype(np.uint32), column_bits))
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert torch.equal(gumbel.gumbel2_torch(keys, columns), expected)
