"""Compile every Triton kernel specialisation the library launches for a Hopper GPU (sm_90),
on a machine without one, and report registers and spills from `ptxas -v`.

Triton's CPU interpreter runs a kernel as NumPy and accepts code that no GPU compiler would
(dtype mismatches in `tl.where`, unsupported casts, shapes that do not lower). Building PTX and a
cubin with the `ptxas` shipped in the triton wheel catches that here and in CI.

    python -m hpd_kernels.ops.aot [--out report.md]

Must run with TRITON_INTERPRET unset or 0 (under the interpreter `@triton.jit` yields no compilable
function); the test suite calls it in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCH = 90
POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def specializations():
    """(kernel name, variant label, signature, constexprs) for every launch the library makes on a GPU."""
    import torch

    from .divergence import DIVERGENCE_CODES
    from .triton_utils import launch_shape

    for dtype, pointer in POINTER.items():
        acc = "*fp64" if dtype == "float64" else "*fp32"
        fp64 = dtype == "float64"
        # What launch_shape picks on a GPU for a large vocabulary (num_warps travels in `block`).
        block = launch_shape(1, 1 << 20, torch.device("cuda"), fp64)
        for name in DIVERGENCES:
            for has_labels in (True, False):
                yield ("divergence_forward", f"{name} {dtype} labels={has_labels}", {
                    "student_ptr": pointer, "teacher_ptr": pointer, "labels_ptr": "*i64", "loss_ptr": acc,
                    "stats_ptr": acc, "scalars_ptr": acc, "n_rows": "i32", "vocab": "i32",
                    "stride_student": "i64", "stride_teacher": "i64", "ignore_index": "i32",
                }, dict(DIVERGENCE=DIVERGENCE_CODES[name], HAS_LABELS=has_labels, FP64=fp64, **block))
            yield ("divergence_backward", f"{name} {dtype}", {
                "student_ptr": pointer, "teacher_ptr": pointer, "stats_ptr": acc, "row_scale_ptr": acc,
                "grad_ptr": pointer, "scalars_ptr": acc, "n_rows": "i32", "vocab": "i32", "student_vocab": "i32",
                "stride_student": "i64", "stride_teacher": "i64", "stride_grad": "i64",
            }, dict(DIVERGENCE=DIVERGENCE_CODES[name], FP64=fp64, **block))
        for sample in (True, False):
            yield ("hybrid_forward", f"{dtype} sample={sample}", {
                "student_ptr": pointer, "teacher_ptr": pointer, "labels_ptr": "*i64", "sampled_ptr": "*i64",
                "loss_ptr": acc, "stats_ptr": acc, "scalars_ptr": acc, "n_rows": "i32", "vocab": "i32",
                "stride_student": "i64", "stride_teacher": "i64", "ignore_index": "i32", "seed": "i64", "row_offset": "i64",
            }, dict(SAMPLE=sample, FP64=fp64, **block))
        yield ("hybrid_backward", dtype, {
            "student_ptr": pointer, "labels_ptr": "*i64", "sampled_ptr": "*i64", "stats_ptr": acc,
            "row_scale_ptr": acc, "grad_ptr": pointer, "scalars_ptr": acc, "n_rows": "i32", "vocab": "i32",
            "student_vocab": "i32", "stride_student": "i64", "stride_grad": "i64",
        }, dict(FP64=fp64, **block))


def _kernel(name):
    from . import divergence, hybrid

    return {
        "divergence_forward": divergence._divergence_forward_kernel,
        "divergence_backward": divergence._divergence_backward_kernel,
        "hybrid_forward": hybrid._hybrid_forward_kernel,
        "hybrid_backward": hybrid._hybrid_backward_kernel,
    }[name]


def ptxas_path(arch: int = ARCH):
    """The ptxas triton itself uses for this architecture (newer wheels ship two)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:  # older triton: get_ptxas() takes no architecture
        return compiler.get_ptxas().path


def ptxas_usage(ptx: str, arch: int = ARCH) -> dict:
    """Registers and spill bytes that `ptxas -v` reports for the PTX's (single) kernel."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}a", source, "-o", os.path.join(folder, "k.cubin")],
                                capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
    }


def compile_one(spec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, variant, signature, constexprs = spec
    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps")
    kernel = _kernel(name)
    full_signature = {arg: signature.get(arg, "constexpr") for arg in kernel.arg_names}
    missing = [arg for arg in kernel.arg_names if arg not in signature and arg not in constexprs]
    if missing:
        raise ValueError(f"{name}: no type for arguments {missing}")
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], f"{name} {variant}: empty cubin"
    usage = ptxas_usage(compiled.asm["ptx"])
    return dict(kernel=name, variant=variant, block_v=constexprs["BLOCK_V"], num_warps=num_warps, cubin_bytes=len(compiled.asm["cubin"]),
                shared_bytes=compiled.metadata.shared, **usage)


def compile_all(jobs: int | None = None):
    specs = list(specializations())
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(compile_one, specs))


def report(rows) -> str:
    import triton

    lines = [f"# Triton kernels compiled ahead of time for sm_{ARCH} (H100/H200)", "",
             f"triton {triton.__version__}, one row per program (BLOCK_N=1), the tile width and warps that "
             "`launch_shape` picks on a GPU for a large vocabulary; registers and spills from `ptxas -v` "
             "(the ptxas triton uses).", "",
             "| kernel | specialisation | BLOCK_V | warps | registers | spill stores (B) | spill loads (B) | shared (B) | cubin (B) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['variant']} | {row['block_v']} | {row['num_warps']} | "
                     f"{row['registers']} | {row['spill_stores']} | "
                     f"{row['spill_loads']} | {row['shared_bytes']} | {row['cubin_bytes']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown report here as well as to stdout")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    text = report(compile_all(args.jobs))
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
