"""Micro timings (pytest-benchmark): forward + backward of every objective, library vs reference.

    python -m pytest bench/test_micro.py --benchmark-only

Not part of the test suite: pyproject's `testpaths` is `tests`, so a plain `pytest` never collects
this file. Each objective at each level is one benchmark group, so pytest-benchmark prints the
reference and the library side by side, and `bench/conftest.py` closes the run with the ratio
reference / hpd_kernels per group. Small shapes (256 tokens x 8192 vocabulary) on the CPU, or on
the GPU when one is visible. Nothing here asserts a time.
"""

import pytest
import torch

from bench import workloads

TOKENS, VOCAB = 256, 8192
STUDENT_HIDDEN, TEACHER_HIDDEN = 64, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPE = workloads.Shape(TOKENS, VOCAB, STUDENT_HIDDEN, TEACHER_HIDDEN, DTYPE, DEVICE)

LOGIT_PAIR = ("reference", "hpd_kernels")
FUSED_PAIR = ("reference fused-linear", "hpd_kernels fused-linear")


def _timed_step(variant, objective):
    torch.manual_seed(0)
    inputs = workloads.make_inputs(workloads.VARIANTS[variant].level, SHAPE)
    step = workloads.build_step(variant, objective, inputs)
    if DEVICE == "cuda":  # time the kernels, not their launch
        def synchronized_step():
            loss = step()
            torch.cuda.synchronize()
            return loss

        return synchronized_step
    return step


def _run(benchmark, record_median, variant, objective, level):
    group = f"{objective} {level} N={TOKENS} V={VOCAB} {DEVICE}"
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, objective=objective, level=level)
    step = _timed_step(variant, objective)
    step()  # warm-up outside the timing (Triton JIT, first-touch allocations)
    benchmark(step)
    record_median(group, variant, benchmark)


@pytest.mark.parametrize("variant", LOGIT_PAIR)
@pytest.mark.parametrize("objective", workloads.BENCHMARKED_OBJECTIVES)
def test_logits_forward_backward(benchmark, record_median, objective, variant):
    _run(benchmark, record_median, variant, objective, "logits")


@pytest.mark.skipif(not workloads.has_fused_linear(), reason="hpd_kernels has no fused-linear API in this checkout")
@pytest.mark.parametrize("variant", FUSED_PAIR)
@pytest.mark.parametrize("objective", workloads.BENCHMARKED_OBJECTIVES)
def test_fused_linear_forward_backward(benchmark, record_median, objective, variant):
    _run(benchmark, record_median, variant, objective, "fused-linear")
