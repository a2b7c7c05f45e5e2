"""The kernels against the reference on the device: values and gradients of every objective.

    python -m bench.gpu_correctness                     # CUDA, Triton kernels (bench/gpu_check.sh)
    python -m bench.gpu_correctness --device cpu        # CPU fallback: the torch backend
    python -m bench.gpu_correctness --objective jsd     # one objective (bench/gpu_check.sh runs them in parallel)
    TRITON_INTERPRET=1 python -m bench.gpu_correctness --device cpu --backend triton --small
    python -m bench.gpu_correctness --benchmark-shape   # bf16 at the benchmark's N=8192, V=151936, every objective
    python -m bench.gpu_correctness --json checks.json  # also every check as a record (bench/gpu_report.py)

One PASS/FAIL line per check; exit status 1 when any check fails. The reference always runs in
float64 on the very values the library sees (inputs rounded to the tested dtype first), so only
the library's arithmetic is under test. Shapes: float64 at small N (exactness, a mismatched
vocabulary that is not a power of two, temperature 2), float32 at V=32000, bfloat16 at the
Qwen vocabulary V=151936 with small N, and the fused-linear losses from hidden states. HPD is
checked with given samples and with its in-kernel samples; on CUDA the Triton and torch backends
must also draw the same samples from the same seed.

Tolerances (error = |library - reference| / max|reference|, per loss and per gradient tensor):
- float64: 1e-10 for losses, 1e-9 for gradients: both sides compute in float64.
- float32 / bfloat16 logits: the library accumulates in float32 (eps 6e-8; log-probabilities
  carry a few eps times the largest logit, ~10 here): 1e-5 for float32 losses, 1e-4 for bfloat16
  (a 152k-term sum); gradients 1e-4 for float32, and 1e-2 for bfloat16, whose gradient is stored
  in bfloat16 (half an ulp is 2^-9 relative to the element).
- fused-linear: both sides take the logits from the input dtype's matmul `hidden @ weight.T`
  (the library one chunk of rows at a time: float32 chunks may round differently from one big
  matmul, hence 1e-4 for losses and 1e-3 for gradients); the reference's float64 logits gradient is
  contracted with the weight and hidden states in float64. bfloat16: the library's gradients pass
  through bfloat16 (the logits gradient, then the hidden-state gradient), 2e-2; losses 1e-4.
- the benchmark shape (`--benchmark-shape`, bfloat16, N=8192, V=151936, the shape bench/gpu_floors.py and
  the reduced benchmark time): the library's loss and gradient over the whole [N, V], the float64
  reference one chunk of rows at a time (a whole [N, V] in float64 is 10 GB), the bfloat16 tolerances
  above; and every value finite (loss, gradient, HPD's samples in range).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import traceback
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

import hpd_kernels
from hpd_kernels import reference
from bench.workloads import BENCHMARKED_OBJECTIVES, IGNORE_INDEX, has_fused_linear, mixture_kwargs

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LogitCase:
    dtype: str
    tokens: int
    student_vocab: int
    teacher_vocab: int
    temperature: float
    loss_tol: float
    grad_tol: float


@dataclass(frozen=True)
class FusedCase:
    dtype: str
    tokens: int
    student_hidden: int
    teacher_hidden: int
    vocab: int
    chunk_size: Optional[int]
    loss_tol: float
    grad_tol: float


LOGIT_CASES = (
    LogitCase("float64", 37, 1000, 1000, 1.0, 1e-10, 1e-9),
    LogitCase("float64", 16, 5003, 5120, 2.0, 1e-10, 1e-9),
    LogitCase("float32", 64, 32000, 32000, 1.0, 1e-5, 1e-4),
    # 16 rows, not fewer: the JIT specialises integers on divisibility by 16, so these bf16 kernels are
    # specialised as at 8192 rows, where gpu_floors and the benchmark take them from the compile cache.
    LogitCase("bfloat16", 16, 151936, 151936, 1.0, 1e-4, 1e-2),
)
FUSED_CASES = (
    FusedCase("float64", 33, 48, 64, 3001, 8, 1e-10, 1e-9),
    FusedCase("float32", 64, 256, 512, 32000, 16, 1e-4, 1e-3),
    FusedCase("bfloat16", 16, 128, 256, 151936, None, 1e-4, 2e-2),
)
# --small: the same kinds of checks at sizes Triton's CPU interpreter gets through in a minute.
SMALL_LOGIT_CASES = (
    LogitCase("float64", 13, 300, 300, 1.0, 1e-10, 1e-9),
    LogitCase("float64", 9, 517, 640, 2.0, 1e-10, 1e-9),
    LogitCase("float32", 16, 4096, 4096, 1.0, 1e-5, 1e-4),
    LogitCase("bfloat16", 4, 5003, 5003, 1.0, 1e-4, 1e-2),
)
SMALL_FUSED_CASES = (
    FusedCase("float64", 11, 16, 24, 517, 4, 1e-10, 1e-9),
    FusedCase("float32", 16, 32, 48, 4096, 8, 1e-4, 1e-3),
)


def relative_error(value, expected) -> float:
    value, expected = value.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if not math.isfinite(scale):
        return math.inf
    difference = (value - expected).abs().max().item() if expected.numel() else 0.0
    return difference / max(scale, 1e-300) if difference else 0.0


def _stable_seed(*parts) -> int:
    """The same inputs on every run (Python's own hash of a str changes per process)."""
    return zlib.crc32(repr(parts).encode())


def _labels(tokens, vocab, generator, device):
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[: max(1, tokens // 8)] = IGNORE_INDEX      # prompt rows
    labels[-1] = vocab + 3                            # a label outside the vocabulary: ignored by the spec
    return labels.to(device)


def _reference_loss(objective, student, teacher, labels, temperature, sampled_ids=None, reduction="mean"):
    kwargs = dict(temperature=temperature, ignore_index=IGNORE_INDEX, reduction=reduction)
    if objective == "hpd":
        return reference.hybrid_kl_loss(student, teacher, labels, sampled_ids, **kwargs)
    return reference.DIVERGENCE_LOSSES[objective](student, teacher, labels, **kwargs, **mixture_kwargs(objective))


def _library_loss(objective, student, teacher, labels, temperature, backend, sampled_ids=None, seed=None):
    kwargs = dict(temperature=temperature, ignore_index=IGNORE_INDEX, backend=backend)
    if objective == "hpd":
        return hpd_kernels.hybrid_kl_loss(student, teacher, labels, sampled_ids=sampled_ids, seed=seed,
                                          return_details=True, **kwargs)
    return hpd_kernels.DIVERGENCE_LOSSES[objective](student, teacher, labels, **kwargs,
                                                    **mixture_kwargs(objective)), None


class Checker:
    def __init__(self, device, backend):
        self.device, self.backend = device, backend
        self.passed = self.failed = 0
        self.records = []     # one per check: what --json writes
        self.meta = {}        # the running check's objective, kind, dtype and shape

    def report(self, ok, name, detail, **fields):
        self.passed += ok
        self.failed += not ok
        self.records.append({"name": " ".join(name.split()), **self.meta, "ok": bool(ok), "detail": detail, **fields})
        print(f"{'PASS' if ok else 'FAIL'}  {name:<62} {detail}", flush=True)

    def compare(self, name, pairs, **fields):
        """pairs: (label, value, expected, tolerance); one line for all of them."""
        errors = [(label, relative_error(value, expected), tol) for label, value, expected, tol in pairs]
        ok = all(error <= tol for _, error, tol in errors)
        self.report(ok, name, "  ".join(f"{label} err {error:.1e} (tol {tol:.0e})" for label, error, tol in errors),
                    errors={label: (error if math.isfinite(error) else None) for label, error, _ in errors},
                    tolerances={label: tol for label, _, tol in errors}, **fields)

    def guarded(self, name, check, *args, meta=None):
        self.meta = dict(meta or {})
        try:
            check(name, *args)
        except Exception as error:  # one broken check must not hide the others
            self.report(False, name, f"{type(error).__name__}: {error}".splitlines()[0][:200])
            traceback.print_exc(limit=3, file=sys.stdout)

    # ------------------------------------------------------------------------------------------
    def logits(self, name, objective, case: LogitCase, sample_in_kernel=False):
        dtype = DTYPES[case.dtype]
        generator = torch.Generator().manual_seed(_stable_seed(objective, case))
        student = torch.randn(case.tokens, case.student_vocab, generator=generator, dtype=torch.float64) * 2
        teacher = torch.randn(case.tokens, case.teacher_vocab, generator=generator, dtype=torch.float64)
        shared = min(case.student_vocab, case.teacher_vocab)
        teacher[:, :shared] += student[:, :shared]
        student, teacher = student.to(dtype).to(self.device), teacher.to(dtype).to(self.device)
        labels = _labels(case.tokens, shared, generator, self.device)

        sampled_ids = None
        if objective == "hpd" and not sample_in_kernel:
            sampled_ids = reference.sample_student(student[:, :shared].double().cpu(), temperature=case.temperature,
                                                   generator=generator).to(self.device)
        leaf = student.clone().requires_grad_(True)
        loss, details = _library_loss(objective, leaf, teacher, labels, case.temperature, self.backend,
                                      sampled_ids=sampled_ids, seed=1234 if sample_in_kernel else None)
        (grad,) = torch.autograd.grad(loss, leaf)
        if sample_in_kernel:
            sampled_ids = details.sampled_ids.clamp(min=0)  # ignored rows carry ignore_index
        expected_leaf = student.double().requires_grad_(True)
        expected = _reference_loss(objective, expected_leaf, teacher.double(), labels, case.temperature, sampled_ids)
        (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
        self.compare(name, [("loss", loss, expected, case.loss_tol), ("grad", grad, expected_grad, case.grad_tol)])

    def same_samples(self, name, case: LogitCase):
        """The README promises the same y_hat from both backends for one seed."""
        dtype = DTYPES[case.dtype]
        generator = torch.Generator().manual_seed(7)
        student = (torch.randn(case.tokens, case.student_vocab, generator=generator) * 2).to(dtype).to(self.device)
        teacher = (torch.randn(case.tokens, case.teacher_vocab, generator=generator)).to(dtype).to(self.device)
        labels = _labels(case.tokens, min(case.student_vocab, case.teacher_vocab), generator, self.device)
        drawn = {backend: hpd_kernels.hpd_token_weights(student, teacher, labels, seed=99, backend=backend,
                                                        temperature=case.temperature).sampled_ids
                 for backend in ("triton", "torch")}
        agreement = (drawn["triton"] == drawn["torch"]).double().mean().item()
        self.report(agreement == 1.0, name, f"same y_hat on {agreement:.1%} of rows")

    def fused(self, name, objective, case: FusedCase):
        dtype = DTYPES[case.dtype]
        generator = torch.Generator().manual_seed(_stable_seed(objective, case))
        randn = lambda *size: torch.randn(*size, generator=generator, dtype=torch.float64)
        hs, ht, v = case.student_hidden, case.teacher_hidden, case.vocab
        student_hidden, teacher_hidden = randn(case.tokens, hs), randn(case.tokens, ht)
        student_weight, teacher_weight = randn(v, hs) * (2 / math.sqrt(hs)), randn(v, ht) * (2 / math.sqrt(ht))
        to_device = lambda tensor: tensor.to(dtype).to(self.device)
        student_hidden, student_weight = to_device(student_hidden), to_device(student_weight)
        teacher_hidden, teacher_weight = to_device(teacher_hidden), to_device(teacher_weight)
        labels = _labels(case.tokens, v, generator, self.device)

        # The reference starts from the logits as the lm_head computes them in the input dtype (what
        # the library does too; with bf16 the rounding of the logits would otherwise flip TVD's
        # sign(p - q) on near-ties), and contracts its float64 logits gradient by hand.
        student_logits = (student_hidden @ student_weight.T).double().requires_grad_(True)
        teacher_logits = (teacher_hidden @ teacher_weight.T).double()
        sampled_ids = None
        if objective == "hpd":
            sampled_ids = reference.sample_student(student_logits.detach().cpu(), generator=generator).to(self.device)
        expected = _reference_loss(objective, student_logits, teacher_logits, labels, 1.0, sampled_ids)
        (grad_logits,) = torch.autograd.grad(expected, student_logits)
        expected_grads = (grad_logits @ student_weight.double(), grad_logits.T @ student_hidden.double())

        leaves = [student_hidden.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)]
        args = (*leaves, teacher_hidden, teacher_weight, labels)
        kwargs = dict(ignore_index=IGNORE_INDEX, chunk_size=case.chunk_size, backend=self.backend)
        if objective == "hpd":
            loss = hpd_kernels.fused_linear_hybrid_kl_loss(*args, sampled_ids=sampled_ids, **kwargs)
        else:
            loss = hpd_kernels.fused_linear_divergence_loss(*args, divergence=objective, **kwargs,
                                                            **mixture_kwargs(objective))
        grads = torch.autograd.grad(loss, leaves)
        self.compare(name, [("loss", loss, expected, case.loss_tol),
                            ("d hidden", grads[0], expected_grads[0], case.grad_tol),
                            ("d weight", grads[1], expected_grads[1], case.grad_tol)])


BENCHMARK_SHAPE = (8192, 151936)        # bench/gpu_floors.FULL's and the reduced benchmark's rows and vocabulary
SMALL_BENCHMARK_SHAPE = (64, 5003)
REFERENCE_ROWS = 256                    # rows of float64 reference per chunk (~0.3 GB a tensor at V=151936)


def bf16_logits(tokens, vocab, device, seed, student=None):
    """[tokens, vocab] bfloat16 logits made on the device a block of rows at a time (no [N, V] float32
    temporary); with `student`, the teacher: its own noise plus the student's logits."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(tokens, vocab, dtype=torch.bfloat16, device=device)
    for start in range(0, tokens, 1024):
        block = torch.randn(min(1024, tokens - start), vocab, generator=generator, device=device)
        logits[start:start + block.shape[0]] = block * 2 if student is None else block + student[start:start + 1024]
    return logits


def benchmark_shape(checker, name, objective, student, teacher, labels, sampled_ids=None):
    """The library's loss and gradient at the benchmark's shape against the float64 reference computed a
    chunk of rows at a time (sums of the chunks' sums; the mean divides by the rows in the loss)."""
    leaf = student.detach().requires_grad_(True)
    loss, details = _library_loss(objective, leaf, teacher, labels, 1.0, checker.backend, sampled_ids=sampled_ids,
                                  seed=1234 if objective == "hpd" and sampled_ids is None else None)
    (grad,) = torch.autograd.grad(loss, leaf)
    del leaf
    if objective == "hpd" and sampled_ids is None:
        sampled_ids = details.sampled_ids
    finite = {"loss": bool(torch.isfinite(loss).item()), "grad": bool(torch.isfinite(grad).all().item())}
    if sampled_ids is not None:
        in_loss = sampled_ids >= 0
        finite["sampled_ids"] = bool((sampled_ids[in_loss] < student.shape[1]).all().item())
    active = int(((labels != IGNORE_INDEX) & (labels < student.shape[1])).sum())
    expected, grad_error, scale = 0.0, 0.0, 0.0
    for start in range(0, student.shape[0], REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        chunk = student[rows].double().requires_grad_(True)
        ids = None if sampled_ids is None else sampled_ids[rows].clamp(min=0)
        total = _reference_loss(objective, chunk, teacher[rows].double(), labels[rows], 1.0, ids, reduction="sum")
        (expected_grad,) = torch.autograd.grad(total, chunk)
        expected_grad /= max(active, 1)
        expected += total.item()
        grad_error = max(grad_error, (grad[rows].double() - expected_grad).abs().max().item())
        scale = max(scale, expected_grad.abs().max().item())
    expected /= max(active, 1)
    errors = [("loss", abs(loss.item() - expected) / max(abs(expected), 1e-300), 1e-4),
              ("grad", grad_error / max(scale, 1e-300), 1e-2)]
    ok = all(error <= tol for _, error, tol in errors) and all(finite.values())
    checker.report(ok, name, "  ".join(f"{label} err {error:.1e} (tol {tol:.0e})" for label, error, tol in errors)
                   + f"  finite: {', '.join(key for key, good in finite.items() if good) or 'none'}",
                   errors={label: error for label, error, _ in errors}, tolerances={label: tol for label, _, tol in errors},
                   finite=finite)
    return sampled_ids


def check_benchmark_shape(checker, objectives, tokens, vocab):
    run = functools.partial(benchmark_shape, checker)
    student = bf16_logits(tokens, vocab, checker.device, 1)
    teacher = bf16_logits(tokens, vocab, checker.device, 2, student)
    labels = _labels(tokens, vocab, torch.Generator().manual_seed(3), checker.device)
    for objective in objectives:
        label = f"{objective} bfloat16 N={tokens} V={vocab} (benchmark shape)"
        meta = dict(objective=objective, kind="benchmark shape", dtype="bfloat16", tokens=tokens, vocab=vocab)
        if objective != "hpd":
            checker.guarded(label, run, objective, student, teacher, labels, meta=meta)
            continue
        drawn = []
        checker.guarded(f"hpd (in-kernel y_hat) bfloat16 N={tokens} V={vocab} (benchmark shape)",
                        lambda name: drawn.append(run(name, "hpd", student, teacher, labels)),
                        meta=dict(meta, objective="hpd (in-kernel y_hat)"))
        if drawn and drawn[0] is not None:  # the given-y_hat path, on the samples the kernel drew
            checker.guarded(label, run, "hpd", student, teacher, labels, drawn[0].clamp(min=0), meta=meta)
        if checker.device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("triton", "torch"),
                        help="default: triton on cuda, torch on cpu")
    parser.add_argument("--objectives", "--objective", nargs="+", choices=BENCHMARKED_OBJECTIVES,
                        default=list(BENCHMARKED_OBJECTIVES))
    parser.add_argument("--small", action="store_true", help="small shapes only (for Triton's CPU interpreter)")
    parser.add_argument("--benchmark-shape", action="store_true",
                        help=f"only bfloat16 at the benchmark's shape, N, V = {BENCHMARK_SHAPE} ({SMALL_BENCHMARK_SHAPE} "
                             "with --small), with finite-value checks")
    parser.add_argument("--json", help="also write every check's record here (bench/gpu_report.py merges it)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --device cpu for the CPU fallback")
    backend = args.backend or ("triton" if args.device == "cuda" else "torch")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"# kernels vs reference on {where}, backend={backend}, torch {torch.__version__}", flush=True)

    checker = Checker(args.device, backend)
    try:
        if args.benchmark_shape:
            check_benchmark_shape(checker, args.objectives, *(SMALL_BENCHMARK_SHAPE if args.small else BENCHMARK_SHAPE))
        else:
            run_cases(checker, args.objectives, args.small, backend)
    finally:
        print(f"# {checker.passed} passed, {checker.failed} failed", flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"device": where, "backend": backend, "passed": checker.passed, "failed": checker.failed,
                           "checks": checker.records}, handle, indent=1)
    return 1 if checker.failed else 0


def run_cases(checker, objectives, small, backend):
    logit_cases = SMALL_LOGIT_CASES if small else LOGIT_CASES
    fused_cases = SMALL_FUSED_CASES if small else FUSED_CASES
    describe = lambda case: (f"{case.dtype:<8} N={case.tokens:<3} V={case.student_vocab}/{case.teacher_vocab} "
                             f"T={case.temperature:g}")
    meta = lambda objective, kind, case: dict(objective=objective, kind=kind, dtype=case.dtype, tokens=case.tokens,
                                              vocab=getattr(case, "vocab", None) or case.student_vocab)
    for objective in objectives:
        for case in logit_cases:
            checker.guarded(f"{objective:<16} {describe(case)}", checker.logits, objective, case,
                            meta=meta(objective, "logits", case))
            if objective == "hpd":
                checker.guarded(f"{'hpd (in-kernel y_hat)':<16} {describe(case)}", checker.logits, objective, case,
                                True, meta=meta("hpd (in-kernel y_hat)", "logits", case))
    if "hpd" in objectives and backend == "triton":
        for case in logit_cases[2:]:
            checker.guarded(f"{'hpd y_hat: triton == torch':<26} {describe(case)}", checker.same_samples, case,
                            meta=meta("hpd", "same samples", case))
    if has_fused_linear():
        for objective in objectives:
            for case in fused_cases:
                label = (f"fused {objective:<16} {case.dtype:<8} N={case.tokens} H={case.student_hidden}/"
                         f"{case.teacher_hidden} V={case.vocab} chunk={case.chunk_size}")
                checker.guarded(label, checker.fused, objective, case, meta=meta(objective, "fused-linear", case))
    else:
        print("SKIP  fused-linear: hpd_kernels has no fused-linear API in this checkout")


if __name__ == "__main__":
    sys.exit(main())
