"""Compile every Triton kernel specialisation the library launches for a Hopper GPU (sm_90),
on a machine without one, exactly as the JIT would specialise it at a real call, and report
registers and spills from `ptxas -v`.

Triton's CPU interpreter runs a kernel as NumPy and accepts code that no GPU compiler would
(dtype mismatches in `tl.where`, unsupported casts, shapes that do not lower, an int argument
that the JIT turns into a constant because it equals 1). Building PTX and a cubin with the
`ptxas` shipped in the triton wheel catches that here and in CI.

How a launch is specialised: the library's own wrappers (`divergence_forward`, `hybrid_forward`,
...) are called on `meta` tensors of a real shape (no memory, and `launch_shape` takes its GPU
branch); each kernel launch is captured instead of run, and its arguments go through Triton's own
binder for a CUDA target. That yields what the JIT yields on the GPU: 16-byte-divisible pointers
(CUDA allocations are aligned), `tt.divisibility=16` on integers divisible by 16 (the vocabulary
151936 and the row strides), i32 for integers that fit, and integers equal to 1 turned into
constants.

    python -m hpd_kernels.ops.aot [--out report.md]

Must run with TRITON_INTERPRET unset or 0 (under the interpreter `@triton.jit` yields no compilable
function); the test suite calls it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ARCH = 90
DTYPES = ("float16", "bfloat16", "float32", "float64")
# The shape every launch is specialised at: 8192 tokens of a Qwen-sized vocabulary.
ROWS, VOCAB = 8192, 151936


@dataclass
class Launch:
    """One captured kernel launch: the kernel's name, a label, and the arguments it was given."""

    kernel: str
    variant: str
    args: tuple
    kwargs: dict
    # Reads and writes of [rows, vocab] data per row and column, in bytes (for the cost model).
    bytes_per_element: int = 0
    passes: int = 1
    overrides: dict = field(default_factory=dict)


def vocabulary_passes(divergence: str) -> int:
    """Forward passes over the vocabulary of a (resolved) divergence: the mixtures need both
    log-sum-exps before any term."""
    return 1 if divergence in ("forward_kl", "reverse_kl") else 2


def matrices_moved(kernel: str, divergence: str | None = None) -> int:
    """How many `[N, V]` logit matrices a launch reads or writes, once each per pass: the memory
    floor of the static model (`bench/sass.py`) and of the GPU check (`bench/gpu_floors.py`)."""
    if kernel == "divergence_forward":
        return 2 * vocabulary_passes(divergence)
    return {"divergence_backward": 3, "hybrid_forward": 2, "hybrid_backward": 2}[kernel]


@contextlib.contextmanager
def _captured(kernels):
    """Replace each kernel's launch by a recorder: `kernel[grid](*args, **kwargs)` stores the call."""
    calls = []
    saved = {}
    for name, kernel in kernels.items():
        saved[name] = kernel.__dict__.get("run")
        kernel.run = (lambda name: lambda *args, grid, warmup, **kwargs: calls.append((name, args, kwargs)))(name)
    try:
        yield calls
    finally:
        for name, kernel in kernels.items():
            if saved[name] is None:
                del kernel.run
            else:
                kernel.run = saved[name]


def _kernels():
    from . import divergence, hybrid

    return {
        "divergence_forward": divergence._divergence_forward_kernel,
        "divergence_backward": divergence._divergence_backward_kernel,
        "hybrid_forward": hybrid._hybrid_forward_kernel,
        "hybrid_backward": hybrid._hybrid_backward_kernel,
    }


@dataclass(frozen=True)
class Setting:
    """One way the captured launches are called: the logit maps (None: the identity), its name in
    the variant labels, whether the entropy is on, which divergences, and whether the divergence
    forward is captured both with and without labels (named `labels=...`) or with labels only."""

    maps: object = None
    name: str = ""
    entropy: bool = False
    divergences: tuple | None = None   # None: every divergence
    both_label_cases: bool = True


def _capture(rows, vocab, dtypes, settings):
    """The launches the library's own wrappers make at `[rows, vocab]` for each dtype and setting."""
    import torch

    from ...registry import DIVERGENCE_STATS, DIVERGENCES, HYBRID_STATS, accumulation_dtype, mixture_logs
    from . import divergence, hybrid

    meta = torch.device("meta")
    found = []
    with _captured(_kernels()) as calls:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            acc = accumulation_dtype(dtype)
            student, teacher = (torch.empty(rows, vocab, dtype=dtype, device=meta) for _ in range(2))
            labels = torch.empty(rows, dtype=torch.int64, device=meta)
            row_scale = torch.empty(rows, dtype=acc, device=meta)
            itemsize = student.element_size()

            def take(kernel, variant, divergence_name=None):
                name, args, kwargs = calls.pop()
                assert name == kernel, (name, kernel)
                passes = vocabulary_passes(divergence_name) if kernel == "divergence_forward" else 1
                found.append(Launch(kernel, variant, args, kwargs, matrices_moved(kernel, divergence_name) * itemsize,
                                    passes))

            for setting in settings:
                maps = {} if setting.maps is None else {"logit_maps": setting.maps}
                entropy = {"with_entropy": True} if setting.entropy else {}
                suffix = f" {setting.name}" if setting.name else ""
                forward_suffix = suffix + (" entropy" if setting.entropy else "")
                for name in setting.divergences or DIVERGENCES:
                    resolved, log_mix_p, log_mix_q = mixture_logs(name, 0.5, 0.1)
                    mixture = dict(divergence=resolved, temperature=1.0, log_mix_p=log_mix_p, log_mix_q=log_mix_q,
                                   **maps)
                    for has_labels in ((True, False) if setting.both_label_cases else (True,)):
                        divergence.divergence_forward(student, teacher, labels if has_labels else None,
                                                      ignore_index=-100, **entropy, **mixture)
                        named = f" labels={has_labels}" if setting.both_label_cases else ""
                        take("divergence_forward", f"{name} {dtype_name}{named}{forward_suffix}", resolved)
                    divergence.divergence_backward(student, teacher, torch.empty(rows, DIVERGENCE_STATS, dtype=acc,
                                                   device=meta), row_scale, torch.empty_like(student), **mixture)
                    take("divergence_backward", f"{name} {dtype_name}{suffix}")
                for sample in (True, False):
                    hybrid.hybrid_forward(student, teacher, labels, None if sample else labels, seed=0, temperature=1.0,
                                          fkl_weight=1.0, rkl_weight=1.0, ignore_index=-100, **maps, **entropy)
                    take("hybrid_forward", f"{dtype_name} sample={sample}{forward_suffix}")
                hybrid.hybrid_backward(student, labels, labels, torch.empty(rows, HYBRID_STATS, dtype=acc, device=meta),
                                       row_scale, torch.empty_like(student), vocab=vocab, temperature=1.0, **maps)
                take("hybrid_backward", f"{dtype_name}{suffix}")
    return found


def launches(rows: int = ROWS, vocab: int = VOCAB, dtypes=DTYPES):
    """Every kernel launch the library makes on a GPU, captured from its own wrappers at `[rows, vocab]`."""
    return _capture(rows, vocab, dtypes, [Setting()])


# The logit maps the variants below compile with: a soft-capped student and a scaled teacher, and
# the other way round (each map kind on each side; the numbers are scalars, not constexprs).
VARIANT_MAPS = (((0.7, 30.0, 1.3, 0.0), "student softcap, teacher scale"),
                ((1.3, 0.0, 0.7, 30.0), "student scale, teacher softcap"))
VARIANT_DTYPES = ("bfloat16", "float64")


def map_launches(rows: int = ROWS, vocab: int = VOCAB, dtypes=VARIANT_DTYPES):
    """The launches with logit maps (`registry.LogitMaps`) and the entropy on, which `launches` (the
    identity maps, no entropy) leaves out: every kernel and divergence with the first of
    `VARIANT_MAPS`, HPD's kernels and forward KL's with the second as well; a float32 and the float64
    accumulation (each has its own tanh)."""
    from ...registry import LogitMaps

    return _capture(rows, vocab, dtypes, [
        Setting(LogitMaps(*numbers), name, entropy=True, divergences=None if index == 0 else ("forward_kl",),
                both_label_cases=False)
        for index, (numbers, name) in enumerate(VARIANT_MAPS)])


def int_arguments(launch: Launch):
    """Names of the launch's plain integer arguments (each of which the JIT would fold if it were 1)."""
    kernel = _kernels()[launch.kernel]
    return [name for name, value in zip(kernel.arg_names, launch.args) if type(value) is int]


def with_ones(launch: Launch) -> Launch:
    """The launch with every plain integer argument set to 1, each of which the JIT then folds into a
    constant (one compile covers them all: a folded argument breaks the code that uses it)."""
    kernel = _kernels()[launch.kernel]
    names = int_arguments(launch)
    args = tuple(1 if name in names else value for name, value in zip(kernel.arg_names, launch.args))
    return Launch(launch.kernel, f"{launch.variant} " + " ".join(f"{name}=1" for name in names), args,
                  launch.kwargs, launch.bytes_per_element, launch.passes)


def specialise(launch: Launch, target):
    """Triton's own binder on the captured arguments: (signature, constexprs, attrs, options)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _kernels()[launch.kernel]
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound, specialization,
                                                              options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: int = ARCH):
    """The compiled kernel (PTX, cubin, metadata) for sm_`arch`, specialised as the JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = specialise(launch, target)
    source = ASTSource(fn=_kernels()[launch.kernel], signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    assert compiled.asm["cubin"], f"{launch.kernel} {launch.variant}: empty cubin"
    return compiled


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


def compile_one(launch: Launch) -> dict:
    compiled = compile_launch(launch)
    usage = ptxas_usage(compiled.asm["ptx"])
    return dict(kernel=launch.kernel, variant=launch.variant, block_v=launch.kwargs["BLOCK_V"],
                num_warps=launch.kwargs["num_warps"], cubin_bytes=len(compiled.asm["cubin"]),
                shared_bytes=compiled.metadata.shared, **usage)


def compile_all(jobs: int | None = None, items=None):
    items = list(launches()) if items is None else list(items)
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(compile_one, items))


def report(rows) -> str:
    import triton

    lines = [f"# Triton kernels compiled ahead of time for sm_{ARCH} (H100/H200)", "",
             f"triton {triton.__version__}. Each launch is captured from the library's wrappers at "
             f"[{ROWS}, {VOCAB}] and specialised by Triton's own binder, as the JIT does on a GPU "
             "(aligned pointers, `tt.divisibility=16` on vocabulary and strides, i32 integers); "
             "registers and spills from `ptxas -v` (the ptxas triton uses).", "",
             "| kernel | specialisation | BLOCK_V | warps | registers | spill stores (B) | spill loads (B) | shared (B) | cubin (B) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['variant']} | {row['block_v']} | {row['num_warps']} | "
                     f"{row['registers']} | {row['spill_stores']} | "
                     f"{row['spill_loads']} | {row['shared_bytes']} | {row['cubin_bytes']} |")
    return "\n".join(lines) + "\n"


def variants_report(rows) -> str:
    """The `map_launches` compiles, a list after the table (whose rows name the identity launches only)."""
    lines = ["", "## With logit maps and the entropy", "",
             "registers / spill stores / spill loads (B), per launch of `map_launches`:", ""]
    lines += [f"- {row['kernel']}, {row['variant']}: {row['registers']} / {row['spill_stores']} / "
              f"{row['spill_loads']}" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown report here as well as to stdout")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    parser.add_argument("--ones", action="store_true",
                        help="compile instead every bfloat16 launch with its integer arguments set to 1 (the JIT "
                             "folds a 1 into a constant), and print one line per compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if args.ones:
        items = [with_ones(launch) for launch in launches(dtypes=("bfloat16",))]
        for row in compile_all(args.jobs, items):
            print(f"compiled {row['kernel']} {row['variant']}")
        return
    items = launches()
    rows = compile_all(args.jobs, items + map_launches())
    text = report(rows[:len(items)]) + variants_report(rows[len(items):])
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
