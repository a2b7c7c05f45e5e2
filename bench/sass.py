"""`python -m bench.sass`: a static cost model of every Triton kernel on an H200, from its SASS.

No GPU is needed. Each kernel launch is captured from the library's own wrappers at
N = 8192 rows and V = 151936 (a Qwen vocabulary) and specialised by Triton's binder exactly as the
JIT specialises it on a GPU (`hpd_kernels.ops.triton.aot`): 16-byte-aligned pointers, `tt.divisibility=16`
on the vocabulary and the strides, i32 integers, the tile and warps `launch_shape` picks. It is
compiled for sm_90 and disassembled with the `cuobjdump` shipped in the triton wheel. The
vocabulary loops are the backward branches of the SASS whose body loads global memory; per element
(one column of one row) the report gives

- SASS instructions: the loop bodies' instructions / the elements one thread handles per iteration
  (`BLOCK_N * BLOCK_V / (32 * num_warps)`); two-pass kernels add both loops;
- MUFU (ex2, lg2, rcp: the special-function unit) instructions and whether the loads are 128-bit;
- registers and spills (`ptxas -v`).

The model (H200 SXM: 132 SMs, 4 schedulers per SM, 1.98 GHz, 16 MUFU lanes per SM, 3.8 TB/s
achievable HBM3e bandwidth of its 4.8 TB/s peak):

    issue time  = N V (instr/element) / 32 / (132 * 4 * 1.98e9)   one warp-instruction per scheduler per clock
    MUFU time   = N V (MUFU/element) / (132 * 16 * 1.98e9)
    memory time = N V (bytes/element) / 3.8e12                   every [N, V] read and write, once per pass
    predicted   = max(issue, MUFU, memory)

Caveats: the issue model is optimistic (it assumes every clock issues; dependent latencies, bank
conflicts in the cross-warp reductions and the tail outside the loop are ignored), the loop count is
static (a data-dependent skip inside the loop is counted as never taken, so skipping only makes the
real kernel faster), and memory time assumes every byte streams once at copy bandwidth. A kernel
whose predicted time is its memory time is "at the floor" in this model; real GPUs lose a few
percent more to launch and tail effects.

    python -m bench.sass                       # prints the report, writes bench/results/sass_sm90.{md,json}
    python -m bench.sass --dtypes bfloat16 --out /tmp/x
    python -m bench.sass --stem sass_sm90_triton36   # under the GPU image's Triton 3.6 (bench/gpu_check.sh
                                                     # picks the JSON whose "triton" matches triton.__version__)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))

SMS, SCHEDULERS, CLOCK_HZ, MUFU_LANES, BANDWIDTH = 132, 4, 1.98e9, 16, 3.8e12
# Targets of the issue this model serves: forward + backward within these multiples of memory time.
TARGETS = {"divergence": 1.25, "hpd sampled": 1.6, "hpd given": 1.25}
# The operation's own floor, in [N, V] passes of the logits' dtype, whatever the kernels do: a
# divergence reads the student and the teacher twice (normalisers, then the terms and the gradient)
# and writes the gradient once; HPD reads both once, the student once more, and writes the gradient.
OPERATION_PASSES = {"divergence": 5, "hpd sampled": 4, "hpd given": 4}
OPERATION_TARGET = 1.05

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str):
    """[(address, opcode, operands)] of the (single) kernel in `cuobjdump -sass` output."""
    return [(int(match.group(1), 16), match.group(3), match.group(4).strip())
            for match in _INSTRUCTION.finditer(text)]


def vocabulary_loops(instructions):
    """(start, end) address ranges of the loops that stream global memory: backward branches whose
    body holds a global load and no EXIT, innermost first-come (no range is kept that contains
    another kept one)."""
    loops = []
    for address, opcode, operands in instructions:
        if opcode.startswith("BRA") and operands.startswith("0x"):
            target = int(operands.split()[0].rstrip(","), 16)
            if target < address:
                body = [ins for ins in instructions if target <= ins[0] <= address]
                # A range holding an EXIT is no loop: it is a jump back from an out-of-line block (a
                # reduction's divergent-warp fallback, `BRA.DIV`) placed after the kernel's end.
                if any(ins[1].startswith("LDG") for ins in body) and not any(ins[1].startswith("EXIT") for ins in body):
                    loops.append((target, address))
    return [loop for loop in loops
            if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in loops)]


def loop_statistics(instructions, loops):
    body = [ins for ins in instructions for start, end in loops if start <= ins[0] <= end]
    loads = [ins for ins in body if ins[1].startswith("LDG")]
    return {
        "instructions": len(body),
        "mufu": sum(ins[1].startswith("MUFU") for ins in body),
        "loads_128": sum(".128" in ins[1] for ins in body),
        "loads_other": sum(".128" not in ins[1] for ins in loads),
        "loops": len(loops),
    }


def cuobjdump_path():
    from hpd_kernels.ops.triton.aot import ptxas_path

    return os.path.join(os.path.dirname(ptxas_path()), "cuobjdump")


def analyse(launch) -> dict:
    from hpd_kernels.ops.triton import aot

    compiled = aot.compile_launch(launch)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        sass = subprocess.run([cuobjdump_path(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    instructions = parse_sass(sass)
    loops = vocabulary_loops(instructions)
    stats = loop_statistics(instructions, loops)
    kwargs = launch.kwargs
    elements_per_thread = kwargs["BLOCK_N"] * kwargs["BLOCK_V"] / (32 * kwargs["num_warps"])
    row = dict(kernel=launch.kernel, variant=launch.variant, block_v=kwargs["BLOCK_V"], num_warps=kwargs["num_warps"],
               bytes_per_element=launch.bytes_per_element, passes=launch.passes,
               instr_per_element=stats["instructions"] / elements_per_thread,
               mufu_per_element=stats["mufu"] / elements_per_thread,
               loads_128=stats["loads_128"], loads_other=stats["loads_other"], loops=stats["loops"],
               **aot.ptxas_usage(compiled.asm["ptx"]))
    row.update(predict(row))
    return row


def predict(row, rows=None, vocab=None) -> dict:
    from hpd_kernels.ops.triton.aot import ROWS, VOCAB

    elements = (rows or ROWS) * (vocab or VOCAB)
    issue = elements * row["instr_per_element"] / 32 / (SMS * SCHEDULERS * CLOCK_HZ)
    mufu = elements * row["mufu_per_element"] / (SMS * MUFU_LANES * CLOCK_HZ)
    memory = elements * row["bytes_per_element"] / BANDWIDTH
    times = {"issue": issue, "MUFU": mufu, "memory": memory}
    bound = max(times, key=times.get)
    return {"issue_ms": issue * 1e3, "mufu_ms": mufu * 1e3, "memory_ms": memory * 1e3,
            "predicted_ms": times[bound] * 1e3, "bound": bound}


def objective_totals(rows):
    """Forward + backward per objective and dtype (the labelled divergence forward, as losses launch it)."""
    from hpd_kernels.ops.triton.aot import ROWS, VOCAB

    totals = []
    by_variant = {(row["kernel"], row["variant"]): row for row in rows}
    dtypes = sorted({row["variant"].split()[1] for row in rows if row["kernel"] == "divergence_backward"})
    from hpd_kernels.registry import DIVERGENCES

    for dtype in dtypes:
        pairs = [(name, "divergence", by_variant[("divergence_forward", f"{name} {dtype} labels=True")],
                  by_variant[("divergence_backward", f"{name} {dtype}")]) for name in DIVERGENCES]
        pairs += [(f"hpd ({kind})", f"hpd {kind}", by_variant[("hybrid_forward", f"{dtype} sample={kind == 'sampled'}")],
                   by_variant[("hybrid_backward", dtype)]) for kind in ("sampled", "given")]
        itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
        for name, family, forward, backward in pairs:
            predicted = forward["predicted_ms"] + backward["predicted_ms"]
            memory = forward["memory_ms"] + backward["memory_ms"]
            ratio = predicted / memory
            floor = OPERATION_PASSES[family] * itemsize * ROWS * VOCAB / BANDWIDTH * 1e3
            totals.append(dict(objective=name, dtype=dtype, predicted_ms=predicted, memory_ms=memory, ratio=ratio,
                               target=TARGETS[family], meets=ratio <= TARGETS[family] + 1e-9,
                               floor_ms=floor, floor_ratio=predicted / floor,
                               meets_floor=predicted / floor <= OPERATION_TARGET + 1e-9,
                               instr_per_element=forward["instr_per_element"] + backward["instr_per_element"]))
    return totals


def skipped_tiles(logits, temperature=1.0, seed=0, block_v=4096):
    """Fraction of vocabulary tiles whose block log-masses the HPD forward kernel skips on these logits
    (`[rows, V]`): the kernel's own rule, replayed with its block scores (`tile_max(s) * log2(e) / T +
    GUMBEL2_MAX + log2(P) + 1 + 1e-6 |best| <= best block score so far`, `ops/gumbel.py`'s block draw).
    The first tile of a row is never skipped."""
    import torch

    from hpd_kernels.ops.common import temperature_scalars
    from hpd_kernels.ops.gumbel import DRAW_BLOCK, GUMBEL2_MAX, LOG2_DRAW_BLOCK, seed_key
    from hpd_kernels.ops.torch_backend.sampling import block_scores, padded_blocks

    rows, vocab = logits.shape
    scale = torch.tensor(temperature_scalars(temperature, torch.float32)[0])
    row_ids, key = torch.arange(rows), seed_key(seed)
    best = torch.full((rows,), float("-inf"))
    skipped = 0
    for start in range(0, vocab, block_v):
        tile = logits[:, start:start + block_v].float()
        tile_max = (tile.max(dim=1).values * scale).float()
        skip = tile_max + (GUMBEL2_MAX + LOG2_DRAW_BLOCK + 1.0) + best.abs() * 1e-6 - best <= 0
        skipped += int(skip.sum())
        blocks = padded_blocks(tile)
        ids = torch.arange(start // DRAW_BLOCK, start // DRAW_BLOCK + blocks.shape[1])
        best = torch.maximum(best, block_scores(blocks, scale, key, row_ids, ids).max(dim=1).values)
    return skipped / (rows * -(-vocab // block_v))


def skip_table(rows=64, vocab=None) -> list:
    """Skipped tiles on flat (Gaussian) logits and on Zipf-like ones: `p(token of rank r) ~ r^-a` over
    a random permutation of the vocabulary (the shape of a trained LM's next-token distribution; a
    larger `a` is a more confident model)."""
    import torch

    from hpd_kernels.ops.triton.aot import VOCAB

    vocab = vocab or VOCAB
    generator = torch.Generator().manual_seed(0)
    cases = [("flat: N(0, 1) logits", torch.randn(rows, vocab, generator=generator), 1.0)]
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    for exponent in (1.0, 1.5, 2.0):
        permutation = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)])
        logits = (-exponent * ranks.log())[permutation]
        for temperature in (1.0, 0.5):
            cases.append((f"Zipf a={exponent}", logits, temperature))
    return [dict(logits=name, temperature=temperature, skipped=skipped_tiles(logits, temperature))
            for name, logits, temperature in cases]


def report(rows, totals, skips=()) -> str:
    import triton

    from hpd_kernels.ops.triton.aot import ROWS, VOCAB

    lines = ["# Static cost model of the Triton kernels on an H200 (sm_90 SASS)", "",
             f"Generated by `python -m bench.sass` (triton {triton.__version__}, no GPU). N = {ROWS} rows, "
             f"V = {VOCAB}. Model: issue = instr x N V / 32 / ({SMS} SMs x {SCHEDULERS} schedulers x "
             f"{CLOCK_HZ / 1e9:.2f} GHz); MUFU = MUFU x N V / ({SMS} x {MUFU_LANES} x {CLOCK_HZ / 1e9:.2f} GHz); "
             f"memory = bytes x N V / {BANDWIDTH / 1e12:.1f} TB/s; predicted = the largest. The issue model is "
             "optimistic (one warp-instruction per scheduler per clock, no stalls); a data-dependent skip inside a "
             "loop is counted as never taken. See the module docstring for the caveats.", "",
             "## Forward + backward per objective", "",
             "`memory` is the kernels' own traffic (every pass they make); the operation floor is the operation's "
             "(a divergence: read the student and the teacher twice, write the gradient once, 5 `[N, V]` passes; "
             f"HPD: 4), whatever the kernels do. Target against it: {OPERATION_TARGET:.2f}x.", "",
             "| objective | dtype | instr/element (fwd+bwd) | predicted (ms) | kernels' memory (ms) | predicted / memory "
             "| target | meets | operation floor (ms) | predicted / floor | meets |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for total in totals:
        lines.append(f"| {total['objective']} | {total['dtype']} | {total['instr_per_element']:.1f} | "
                     f"{total['predicted_ms']:.2f} | {total['memory_ms']:.2f} | {total['ratio']:.2f}x | "
                     f"{total['target']:.2f}x | {'yes' if total['meets'] else '**no**'} | {total['floor_ms']:.2f} | "
                     f"{total['floor_ratio']:.2f}x | {'yes' if total['meets_floor'] else '**no**'} |")
    lines += ["", "## Every kernel", "",
              "| kernel | specialisation | BLOCK_V | warps | instr/element | MUFU/element | LDG.128 / other LDG in loop "
              "| registers | spills (B) | bytes/element | issue (ms) | MUFU (ms) | memory (ms) | bound |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['kernel']} | {row['variant']} | {row['block_v']} | {row['num_warps']} | "
                     f"{row['instr_per_element']:.1f} | {row['mufu_per_element']:.2f} | "
                     f"{row['loads_128']} / {row['loads_other']} | {row['registers']} | "
                     f"{row['spill_stores'] + row['spill_loads']} | {row['bytes_per_element']} | {row['issue_ms']:.2f} | "
                     f"{row['mufu_ms']:.2f} | {row['memory_ms']:.2f} | {row['bound']} |")
    if skips:
        lines += ["", "## HPD sampling: block-mass work skipped at run time", "",
                  "Not in the static model (which counts the block masses of every tile). A tile's block masses are "
                  "skipped when its best scaled logit plus log2(P), the largest noise and a margin cannot beat the "
                  "running best block score; replayed with the kernel's rule and noise on 64 rows of V = 151936 "
                  "(`skipped_tiles`):", "",
                  "| logits | T | tiles skipped |", "|---|---:|---:|"]
        for skip in skips:
            lines.append(f"| {skip['logits']} | {skip['temperature']} | {100 * skip['skipped']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["float16", "bfloat16", "float32"], help="logit dtypes (default: bfloat16 float32)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for STEM.md and STEM.json (default: bench/results)")
    parser.add_argument("--stem", default="sass_sm90", help="output file names, STEM.md and STEM.json (default: "
                        "%(default)s; sass_sm90_tritonXY for another Triton release, as bench/gpu_floors.py looks for)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: all cores)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.exit(2, "python -m bench.sass: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)\n")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.exit(2, f"python -m bench.sass: --out {args.out} is not a folder\n")
    from hpd_kernels.ops.triton import aot

    launches = aot.launches(dtypes=args.dtypes)
    with ProcessPoolExecutor(max_workers=args.jobs or os.cpu_count() or 1) as pool:
        rows = list(pool.map(analyse, launches))
    totals = objective_totals(rows)
    skips = skip_table()
    text = report(rows, totals, skips)
    print(text)
    import triton

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.stem}.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, f"{args.stem}.json"), "w") as handle:
        json.dump({"triton": triton.__version__, "rows": aot.ROWS, "vocab": aot.VOCAB, "model": dict(sms=SMS, schedulers=SCHEDULERS, clock_hz=CLOCK_HZ, mufu_lanes=MUFU_LANES,
                                 bandwidth=BANDWIDTH), "kernels": rows, "objectives": totals,
                   "hpd_skipped_tiles": skips}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
