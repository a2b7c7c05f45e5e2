"""The GPU's floors, and every Triton kernel alone against them, at the cost model's shape.

    python -m bench.gpu_floors                                          # CUDA: N=8192, V=151936, bf16
    TRITON_INTERPRET=1 python -m bench.gpu_floors --device cpu --small  # the plumbing, on a CPU

Floors, on an [N, V] tensor of the logits' dtype:
- copy: `dst.copy_(src)`, bytes read + written per second: what a one-pass streaming kernel reaches;
- read: `src.sum(dtype=float32)`, bytes read per second (the forward kernels only read);
- GEMM: a bf16 matmul of 8192 x 4096 x 4096, in TFLOP/s.

Each kernel alone, launched through its wrapper in `hpd_kernels.ops` (no autograd, no reduction,
no allocation of the gradient), on logits whose every row is in the loss (the kernels skip the
loads of ignored rows, which would then move fewer bytes than counted). Bytes moved, as the
static cost model counts them (`python -m bench.sass`, bytes per element from `hpd_kernels/ops/triton/aot.py`),
at its N, V and dtype:
- forward: student + teacher, once per vocabulary pass: 1 pass for forward KL, reverse KL and
  HPD, 2 for JSD, skew KL and TVD (the mixture needs both log-sum-exps before any term);
- backward: the student read and the gradient written, plus the teacher read for the
  divergences (HPD's backward needs only the student).
GB/s = bytes / time (1 GB = 1e9 bytes); "% of copy" = that over the copy floor's GB/s, "% of read"
over the read floor's (the forward kernels only read).

The fused-linear HPD loss from hidden states (`fused_linear_hybrid_kl_loss`, N x H hidden states,
[V, H] weights), forward + backward, against its floor: four GEMMs of 2 N H V flops (student
logits, teacher logits, the hidden states' gradient, the weight's gradient) at the measured rate.

Each kernel's row carries the static model's prediction for the same launch (`python -m bench.sass`;
the JSON generated under this Triton's major.minor, else the newest, said so: `gpu_report.
choose_static_model`), as generated and rescaled to the copy bandwidth measured here (`model_ms_at_copy`).
Kernel outputs and the fused-linear loss and gradients are checked finite; the fused-linear row names
the `grad_W` GEMM path that ran (bf16 operands accumulating in fp32, or the upcast fallback).

Times: CUDA events around each call (on a CPU, the wall clock), the median of the repeats after
warm-up calls. Writes `gpu_floors.json` and `gpu_floors.md` to `--out`; exit status 1 when any
measurement failed (the others are still written).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import triton

import hpd_kernels
from bench import gpu_floors_md, gpu_report, report, workloads
from bench.workloads import IGNORE_INDEX, JSD_BETA, SKEW_ALPHA
from hpd_kernels.ops.chunked_linear import half_operand_gemm
from hpd_kernels.ops.triton.aot import matrices_moved
from hpd_kernels.ops.triton.divergence import divergence_backward, divergence_forward
from hpd_kernels.registry import accumulation_dtype, mixture_logs
from hpd_kernels.ops.triton.hybrid import hybrid_backward, hybrid_forward
from hpd_kernels.ops.triton.utils import interpreter_enabled

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9
OUTPUT_STEM = "gpu_floors"
STATIC_MODEL = os.path.join(HERE, "results", "sass_sm90.json")   # `python -m bench.sass`, at FULL's N and V
GRAD_W_PATHS = {True: "bf16 operands, fp32 accumulation (addmm out_dtype)", False: "upcast to fp32 (fallback)"}


@dataclass(frozen=True)
class Sizes:
    rows: int
    vocab: int
    hidden: int                   # fused-linear hidden size, student and teacher
    gemm: tuple                   # (M, K, N) of the GEMM floor
    warmup: int
    repeats: int
    fused_repeats: int            # the fused-linear step takes ~100 ms at full size: fewer repeats


# Full: the shape the cost model predicts for (8192 tokens of a Qwen-sized vocabulary); ~15 GB of
# GPU memory at most. Small: what Triton's CPU interpreter runs in seconds, a vocabulary that is not
# a power of two and spans one tile.
FULL = Sizes(rows=8192, vocab=151936, hidden=4096, gemm=(8192, 4096, 4096), warmup=3, repeats=10, fused_repeats=5)
SMALL = Sizes(rows=32, vocab=3000, hidden=64, gemm=(64, 64, 64), warmup=1, repeats=3, fused_repeats=2)


def median_ms(call, device: str, warmup: int, repeats: int) -> float:
    """Milliseconds per call: the median of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _bandwidth_row(name, milliseconds, moved_bytes, floor_gb_per_s=None):
    """`floor_gb_per_s`: {"copy": GB/s, "read": GB/s}, the floors this row is a percentage of."""
    gb_per_s = moved_bytes / GB / (milliseconds / 1e3)
    row = {"name": name, "ms": milliseconds, "bytes": moved_bytes, "gb_per_s": gb_per_s}
    for floor, rate in (floor_gb_per_s or {}).items():
        if rate:
            row[f"percent_of_{floor}"] = 100.0 * gb_per_s / rate
    return row


def _failure(name, error, failures, **fields):
    """The row of a measurement that raised: recorded, so that it does not hide the others."""
    failures.append(name)
    traceback.print_exc(limit=3)
    return {"name": name, **fields, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}


def _add(rows, row):
    rows.append(row)
    print("  " + _row_line(row), flush=True)
    return row


def _guarded(rows, failures, name, measure, **fields):
    """Measure one row (plus `fields`) and add it to `rows`; a failure becomes an error row."""
    try:
        row = {**measure(), **fields}
    except Exception as error:
        row = _failure(name, error, failures, **fields)
    return _add(rows, row)


def _row_line(row):
    if "error" in row:
        return f"{row['name']:<34} error: {row['error']}"
    text = f"{row['name']:<34} {row['ms']:9.3f} ms"
    if "gb_per_s" in row:
        text += f"  {row['bytes'] / GB:8.3f} GB  {row['gb_per_s']:8.1f} GB/s"
    if "percent_of_copy" in row:
        text += f"  {row['percent_of_copy']:5.1f}% of copy"
    if "percent_of_read" in row:
        text += f"  {row['percent_of_read']:5.1f}% of read"
    if "tflop_per_s" in row:
        text += f"  {row['tflop_per_s']:8.1f} TFLOP/s"
    if "percent_of_floor" in row:
        text += f"  floor {row['floor_ms']:.3f} ms ({row['percent_of_floor']:.1f}% of it)"
    return text


# ----------------------------------------------------------------------------------------------
# The measurements.
# ----------------------------------------------------------------------------------------------

def logit_inputs(sizes: Sizes, dtype, device):
    """Student and teacher logits as the benchmark makes them, with every row in the loss."""
    shape = workloads.Shape(sizes.rows, sizes.vocab, sizes.hidden, sizes.hidden, dtype, device)
    inputs = workloads.make_inputs("logits", shape)
    labels = torch.randint(0, sizes.vocab, (sizes.rows,), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    return inputs["student"].detach(), inputs["teacher"], labels


def measure_floors(student, sizes: Sizes, device, failures):
    """Copy and read bandwidth on the logits, and the GEMM rate: the rows, {"copy": GB/s, "read": GB/s}
    and TFLOP/s (None where a measurement failed)."""
    rows = []
    matrix_bytes = student.numel() * student.element_size()
    destination = torch.empty_like(student)
    copy = _guarded(rows, failures, "copy [N, V] (read + write)", lambda: _bandwidth_row(
        "copy [N, V] (read + write)",
        median_ms(lambda: destination.copy_(student), device, sizes.warmup, sizes.repeats), 2 * matrix_bytes))
    del destination
    read = _guarded(rows, failures, "read [N, V] (sum in fp32)", lambda: _bandwidth_row(
        "read [N, V] (sum in fp32)",
        median_ms(lambda: student.sum(dtype=torch.float32), device, sizes.warmup, sizes.repeats), matrix_bytes))

    m, k, n = sizes.gemm
    gemm_name = f"GEMM bf16 {m}x{k}x{n}"

    def gemm():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        milliseconds = median_ms(lambda: a @ b, device, sizes.warmup, sizes.repeats)
        return {"name": gemm_name, "ms": milliseconds, "flops": 2 * m * k * n,
                "tflop_per_s": 2 * m * k * n / (milliseconds / 1e3) / 1e12}

    gemm_row = _guarded(rows, failures, gemm_name, gemm)
    return rows, {"copy": copy.get("gb_per_s"), "read": read.get("gb_per_s")}, gemm_row.get("tflop_per_s")


@dataclass(frozen=True)
class Launch:
    objective: str
    direction: str            # "forward" or "backward"
    model_kernel: str         # the launch's name and specialisation in the static model (bench/sass.py)
    model_variant: str
    call: Callable
    moved_bytes: int


def kernel_families(student, teacher, labels):
    """(objective, setup) per objective; `setup()` runs the forward once (the backward needs its stats,
    HPD's given y_hat its samples) and returns that objective's launches."""
    n_rows, vocab = student.shape
    matrix_bytes = student.numel() * student.element_size()
    dtype = str(student.dtype).removeprefix("torch.")
    acc_dtype = accumulation_dtype(student.dtype)
    row_scale = torch.full((n_rows,), 1.0 / n_rows, dtype=acc_dtype, device=student.device)  # a mean's gradient
    grad = torch.empty_like(student)

    def divergence(objective):
        resolved, log_mix_p, log_mix_q = mixture_logs(objective, JSD_BETA, SKEW_ALPHA)
        params = dict(divergence=resolved, temperature=1.0, log_mix_p=log_mix_p, log_mix_q=log_mix_q)
        forward = functools.partial(divergence_forward, student, teacher, labels, ignore_index=IGNORE_INDEX, **params)
        stats = forward().stats
        backward = functools.partial(divergence_backward, student, teacher, stats, row_scale, grad, **params)
        return [Launch(objective, "forward", "divergence_forward", f"{objective} {dtype} labels=True", forward,
                       matrices_moved("divergence_forward", resolved) * matrix_bytes),
                Launch(objective, "backward", "divergence_backward", f"{objective} {dtype}", backward,
                       matrices_moved("divergence_backward") * matrix_bytes)]

    def hpd():
        params = dict(temperature=1.0, fkl_weight=1.0, rkl_weight=1.0, ignore_index=IGNORE_INDEX)
        sampling = functools.partial(hybrid_forward, student, teacher, labels, None, seed=workloads.HPD_SEED, **params)
        drawn = sampling()
        stats, sampled_ids = drawn.stats, drawn.sampled_ids
        given = functools.partial(hybrid_forward, student, teacher, labels, sampled_ids, seed=None, **params)
        backward = functools.partial(hybrid_backward, student, labels, sampled_ids, stats, row_scale, grad,
                                     vocab=vocab, temperature=1.0)
        forward_bytes = matrices_moved("hybrid_forward") * matrix_bytes
        return [Launch("hpd (in-kernel y_hat)", "forward", "hybrid_forward", f"{dtype} sample=True", sampling,
                       forward_bytes),
                Launch("hpd (given y_hat)", "forward", "hybrid_forward", f"{dtype} sample=False", given, forward_bytes),
                Launch("hpd", "backward", "hybrid_backward", dtype, backward,
                       matrices_moved("hybrid_backward") * matrix_bytes)]

    return [(objective, functools.partial(divergence, objective)) for objective in workloads.DIVERGENCES] + [
        ("hpd", hpd)]


def load_model(path):
    """The static model's predictions, {(kernel, variant): row}, and its bandwidth in bytes/s (or empty)."""
    try:
        with open(path) as handle:
            model = json.load(handle)
        return ({(row["kernel"], row["variant"]): row for row in model["kernels"]},
                model.get("model", {}).get("bandwidth"))
    except (OSError, ValueError, KeyError, TypeError):
        return {}, None


def finite(result) -> bool:
    """Whether every floating-point tensor a kernel wrapper returned is finite."""
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(t).all()) for t in tensors
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def _model_fields(predicted, model_scale, model_bandwidth, copy_gb_per_s):
    fields = dict(model_ms=predicted["predicted_ms"] * model_scale, model_bound=predicted["bound"],
                  model_bytes_per_element=predicted.get("bytes_per_element"))
    parts = {key: predicted.get(f"{key}_ms") for key in ("issue", "mufu", "memory")}
    if None not in parts.values() and model_bandwidth and copy_gb_per_s:
        fields.update(gpu_report.rescale(parts, model_bandwidth, copy_gb_per_s * GB, model_scale))
    return fields


def measure_kernels(student, teacher, labels, sizes: Sizes, device, floor_gb_per_s, model, failures):
    rows = []
    model, model_bandwidth = model
    # The model's times are elements x a cost per element: they scale with N V from its shape, FULL's.
    model_scale = sizes.rows * sizes.vocab / (FULL.rows * FULL.vocab)
    for family, setup in kernel_families(student, teacher, labels):
        try:
            launches = setup()
        except Exception as error:  # this objective's forward is broken: nothing of it to time
            _add(rows, _failure(f"{family} setup", error, failures, objective=family, direction="setup"))
            continue
        for launch in launches:
            name = f"{launch.objective} {launch.direction}"
            fields = dict(objective=launch.objective, direction=launch.direction, model_kernel=launch.model_kernel,
                          model_variant=launch.model_variant)
            predicted = model.get((launch.model_kernel, launch.model_variant))
            if predicted:
                fields.update(_model_fields(predicted, model_scale, model_bandwidth, floor_gb_per_s.get("copy")))

            def measure():
                row = _bandwidth_row(name, median_ms(launch.call, device, sizes.warmup, sizes.repeats),
                                     launch.moved_bytes, floor_gb_per_s)
                row["finite"] = finite(launch.call())
                if not row["finite"]:
                    failures.append(f"{name}: non-finite output")
                return row

            _guarded(rows, failures, name, measure, **fields)
    return rows


def measure_fused_linear(sizes: Sizes, dtype, device, gemm_tflop_per_s, failures):
    shape = workloads.Shape(sizes.rows, sizes.vocab, sizes.hidden, sizes.hidden, dtype, device)
    name = f"fused-linear hpd N={sizes.rows} H={sizes.hidden} fwd+bwd"
    flops = 4 * 2 * sizes.rows * sizes.hidden * sizes.vocab

    def measure():
        inputs = workloads.make_inputs("hidden", shape)
        step = workloads.build_step("hpd_kernels fused-linear", "hpd", inputs)
        milliseconds = median_ms(step, device, 1, sizes.fused_repeats)
        loss = workloads.loss_function("hpd_kernels fused-linear", "hpd", inputs)()
        grads = torch.autograd.grad(loss, workloads.leaves(inputs))
        row = {"name": name, "ms": milliseconds, "flops": flops, "finite": finite((loss.detach(), *grads)),
               "grad_w_gemm": GRAD_W_PATHS[half_operand_gemm(torch.device(device), dtype)]}
        del loss, grads
        if not row["finite"]:
            failures.append(f"{name}: non-finite loss or gradient")
        if gemm_tflop_per_s:
            row["floor_ms"] = flops / (gemm_tflop_per_s * 1e12) * 1e3
            row["percent_of_floor"] = 100.0 * row["floor_ms"] / milliseconds
        return row

    return _guarded([], failures, name, measure)


# ----------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------

def write_outputs(record, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, OUTPUT_STEM)
    with open(base + ".json", "w") as handle:
        json.dump(record, handle, indent=1)
    with open(base + ".md", "w") as handle:
        handle.write(gpu_floors_md.markdown(record, FULL.rows, FULL.vocab))
    return base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for Triton's CPU interpreter)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    parser.add_argument("--model", help="the static model's JSON (python -m bench.sass), whose predictions join the "
                        "kernels' rows (default: bench/results/sass_sm90*.json generated under this Triton's "
                        "major.minor, else the newest)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --device cpu --small with TRITON_INTERPRET=1")
    if args.device == "cpu" and not interpreter_enabled():
        raise SystemExit("--device cpu runs the Triton kernels through Triton's interpreter: set TRITON_INTERPRET=1")
    choice = gpu_report.choose_static_model(triton.__version__, os.path.dirname(STATIC_MODEL), args.model)
    print(f"static model: {choice['note']}", flush=True)
    sizes = SMALL if args.small else FULL
    dtype = torch.bfloat16
    started = time.perf_counter()
    torch.manual_seed(0)
    record = {
        "title": f"GPU floors and each kernel alone: {args.device}, bfloat16, N={sizes.rows}, V={sizes.vocab}",
        "command": " ".join(["python -m bench.gpu_floors", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "date": report.now_iso(),
        "machine": report.describe_machine(args.device),
        "settings": {"rows": sizes.rows, "vocab": sizes.vocab, "hidden": sizes.hidden, "dtype": "bfloat16",
                     "gemm": list(sizes.gemm), "warmup": sizes.warmup, "repeats": sizes.repeats,
                     "fused_repeats": sizes.fused_repeats, "device": args.device,
                     "model": choice["path"] and os.path.relpath(choice["path"]), "static_model": choice,
                     "kernels": "triton (interpreter)" if args.device == "cpu" else "triton",
                     "hpd_kernels": getattr(hpd_kernels, "__version__", None)},
    }
    failures = []
    print(f"# floors and kernels on {report.machine_line(record['machine'])}", flush=True)
    student, teacher, labels = logit_inputs(sizes, dtype, args.device)
    record["floors"], floor_gb_per_s, gemm_tflop_per_s = measure_floors(student, sizes, args.device, failures)

    record["kernels"] = measure_kernels(student, teacher, labels, sizes, args.device, floor_gb_per_s,
                                        load_model(choice["path"]) if choice["path"] else ({}, None), failures)
    del student, teacher, labels
    if args.device == "cuda":
        torch.cuda.empty_cache()

    record["fused_linear"] = measure_fused_linear(sizes, dtype, args.device, gemm_tflop_per_s, failures)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["failures"] = failures
    base = write_outputs(record, args.out)
    print(f"wrote {base}.json, {base}.md ({record['seconds']:.0f} s)"
          + (f"; failed: {', '.join(failures)}" if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
