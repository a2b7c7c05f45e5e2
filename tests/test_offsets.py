"""64-bit offsets: `N * V` above 2^31 elements is normal (16k tokens x 152k vocabulary).

The logits here are three rows of a row-strided view whose last row starts 2^31 + 34 elements
into its storage (a 4 GiB bfloat16 buffer that `torch.empty` reserves but only touches where the
rows lie). With 32-bit offset arithmetic, row 2's loads and the in-place gradient's stores would
wrap to a negative offset: wrong numbers or a crash. The check runs in a subprocess so that a
crash is reported as this test failing, not as the test session dying.
"""

import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from hpd_kernels import reference
    from hpd_kernels.ops.triton import divergence, hybrid

    vocab, stride, n_rows = 1000, 2**30 + 17, 3
    assert (n_rows - 1) * stride > 2**31
    storage = torch.empty((n_rows - 1) * stride + vocab, dtype=torch.bfloat16)
    student = storage.as_strided((n_rows, vocab), (stride, 1))
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(n_rows, vocab, generator=generator) * 2).bfloat16()
    student.copy_(values)
    teacher = torch.randn(n_rows, vocab, generator=generator, dtype=torch.float64)
    labels = torch.tensor([5, 6, 7])
    row_scale = torch.ones(n_rows)
    s64 = values.double().requires_grad_(True)

    # HPD: forward reads row 2, backward writes the gradient over the logits in place.
    loss, stats, sampled, _ = hybrid.hybrid_forward(student, teacher, labels, None, seed=1, temperature=1.0,
                                                 fkl_weight=1.0, rkl_weight=1.0, ignore_index=-100)
    ref = reference.hybrid_kl_loss(s64, teacher, labels, sampled, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    hybrid.hybrid_backward(student, labels, sampled, stats, row_scale, student, vocab=vocab, temperature=1.0)
    torch.testing.assert_close(student.double(), ref_grad, rtol=2**-7, atol=1e-6)

    # A divergence (two forward passes): same checks.
    student.copy_(values)
    loss, stats, _ = divergence.divergence_forward(student, teacher, labels, divergence="jsd", temperature=1.0,
                                                log_mix_p=-0.6931471805599453, log_mix_q=-0.6931471805599453,
                                                ignore_index=-100)
    ref = reference.generalized_jsd_loss(s64, teacher, labels, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    divergence.divergence_backward(student, teacher, stats, row_scale, student, divergence="jsd", temperature=1.0,
                                   log_mix_p=-0.6931471805599453, log_mix_q=-0.6931471805599453)
    torch.testing.assert_close(student.double(), ref_grad, rtol=2**-7, atol=1e-6)
    print("offsets ok")
""")


def test_offsets_beyond_two_to_the_31_elements():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "offsets ok" in result.stdout, (
        f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
