#!/usr/bin/env bash
# GPU check, for a CUDA machine that already has torch and triton (installs nothing, needs no network).
# It has to fit one 10-minute call of the device tool with margin; each step has a time limit:
#
#   step          limit (s)  what
#   preflight        25      GPU, python/torch/triton/numpy versions, a C compiler and Python.h, CUDA visible
#   correctness     120      every objective's kernels against the float64 reference, one process per
#                            objective, all in parallel
#   floors           65      copy/read bandwidth, a bf16 GEMM, each kernel alone (GB/s, % of copy), the
#                            fused-linear HPD loss against its four-GEMM floor
#   trainer          50      bf16 autocast trainer steps with the Triton losses against fp32
#   benchmark        90      `python -m bench` reduced: JSD and HPD at 8192 tokens
#   total           350      (tests/test_gpu_check.py: the `timeout`s below add up to this, and to <= 360)
#
# Every Triton JIT compile happens once: the steps share one TRITON_CACHE_DIR, and the correctness
# checks compile the bf16 kernels at the specialisation the later steps launch.
# Outputs, in "${OUT:-bench/results}" (8 files at most, what the device tool returns):
#   gpu_check_log.txt          everything printed here, the summary last
#   gpu_correctness.txt        every objective's PASS/FAIL lines, with its exit status
#   gpu_floors.{json,md}       floors and each kernel alone
#   bench_cuda_bfloat16_V151936.{json,md,png}
# Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when the preflight failed.
#
#   bash bench/gpu_check.sh             # PYTHON=python3.12 bash bench/gpu_check.sh to pick the interpreter
#   DRY_RUN=1 bash bench/gpu_check.sh   # the same steps on this machine's CPU at tiny sizes: the plumbing
#   GPU_CHECK_OBJECTIVES="hpd jsd" bash bench/gpu_check.sh   # correctness for these objectives only
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
dry_run="${DRY_RUN:-0}"
work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT
# Compiled kernels and their launchers, for every step and process; not under $OUT, whose files come back.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/hpd_gpu_check_triton_cache}"
export TRITON_INTERPRET=0   # the GPU runs compiled kernels; only the dry run's floors step interprets

if [ "$dry_run" = 1 ]; then
  device=cpu
  correctness_args=(--device cpu --small)          # the torch backend, small shapes
  floors_interpret=1                               # the Triton kernels through the CPU interpreter
  floors_args=(--device cpu --small)
  trainer_args=(--device cpu --steps 6)
  bench_args=(--device cpu --quick --objectives hpd --tokens 64 --variants reference hpd_kernels)
else
  device=cuda
  correctness_args=(--device cuda)
  floors_interpret=0
  floors_args=(--device cuda)
  trainer_args=(--device cuda)
  # 8192 tokens, the floors' shape, so the library's autograd step compares with its kernels alone;
  # torch.compile only for HPD (10-60 s to compile), and the benchmark runs it last of its objective.
  bench_args=(--device cuda --objectives jsd hpd --tokens 8192 --repeats 3 --warmup 1 --compile-objectives hpd)
fi

# The interpreter: $PYTHON, else the first of python3 / python that has torch (found, not imported:
# importing it takes seconds, and the preflight's time limit counts those).
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
      py="$candidate"; break
    fi
  done
fi

step_names=(); step_statuses=(); step_seconds=()
record_step() {  # NAME STATUS STARTED_AT
  step_names+=("$1"); step_statuses+=("$2"); step_seconds+=($((SECONDS - $3)))
}

verdict() {
  case "$1" in
    0) echo "ok" ;;
    124|137) echo "TIMED OUT" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

preflight() {
  echo "== preflight ($device$([ "$dry_run" = 1 ] && echo ', dry run'))"
  [ -n "$py" ] || { echo "no python with torch found; set PYTHON=/path/to/python"; return 2; }
  # Budget 25 s: one python start importing torch, triton and hpd_kernels (10-15 s on a cold disk),
  # nvidia-smi and a syntax-only compile of Python.h (~1 s each).
  timeout 25 "$py" - "$device" "$dry_run" "$work_dir/objectives" <<'EOF'
import os, re, shutil, subprocess, sys, sysconfig, tempfile

device, dry_run, objectives_file = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
problems = []
version = lambda text: tuple(int(part) for part in re.findall(r"\d+", text)[:2])
if device == "cuda":
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpus = ""
    print(f"gpu: {gpus or '(no nvidia-smi)'}")
import numpy
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numpy {numpy.__version__}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    triton = None
    problems.append("triton is not installed")
try:
    import liger_kernel  # noqa: F401
    print("liger_kernel: installed (its JSD variants will be benchmarked)")
except ImportError:
    print("liger_kernel: not installed (its variants are skipped)")

# Triton builds each kernel's launcher as a C extension (triton/runtime/build.py): with $CC, else gcc,
# else clang, against the headers in sysconfig's "include" path. Without them the first kernel
# launch fails deep in a compile; here it fails first, and says what to install.
compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
compiler_path = shutil.which(compiler) if compiler else None
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
headers_package = f"python{sys.version_info.major}.{sys.version_info.minor}-dev"
if compiler_path is None:
    problems.append(f"no C compiler ({'CC=' + compiler if compiler else 'no $CC, gcc or clang'}): Triton builds "
                    "each kernel's launcher with one; apt-get install gcc, or set CC")
elif not os.path.exists(os.path.join(include, "Python.h")):
    problems.append(f"no Python.h in {include}: Triton compiles its launcher against this Python's headers; "
                    f"apt-get install {headers_package} (or the headers of {sys.executable})")
else:
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "check.c")
        with open(source, "w") as handle:
            handle.write("#include <Python.h>\nint main(void) { return 0; }\n")
        built = subprocess.run([compiler_path, "-fsyntax-only", f"-I{include}", source], capture_output=True,
                               text=True, timeout=15)
    if built.returncode:
        problems.append(f"{compiler_path} cannot compile against {include}/Python.h: "
                        + " ".join(built.stderr.split())[:300])
    else:
        print(f"C compiler {compiler_path}, Python.h in {include}: Triton can build its launchers")

# Triton <= 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"; fixed in Triton 3.7).
if dry_run and triton is not None and version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
    problems.append(f"triton {triton.__version__}'s CPU interpreter (the dry run's floors step) fails with "
                    f"numpy {numpy.__version__}: pip install 'numpy<2.4'")
if device == "cuda":
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        print(f"{properties.name}, sm_{properties.major}{properties.minor}, "
              f"{properties.total_memory / 2**30:.0f} GiB")
    else:
        problems.append("torch sees no CUDA device")

from bench.workloads import BENCHMARKED_OBJECTIVES  # imports hpd_kernels and its reference: they must import here too
with open(objectives_file, "w") as handle:
    handle.write(" ".join(BENCHMARKED_OBJECTIVES))
for problem in problems:
    print(f"PREFLIGHT FAILED: {problem}")
sys.exit(2 if problems else 0)
EOF
  local status=$?
  [ "$status" -eq 0 ] || { echo "preflight: exit $status; nothing else runs"; return 2; }
}

correctness() {
  local objectives objective code took counts status=0
  if [ -n "${GPU_CHECK_OBJECTIVES:-}" ]; then
    read -r -a objectives <<<"$GPU_CHECK_OBJECTIVES"
  else
    read -r -a objectives <"$work_dir/objectives"
  fi
  echo "== correctness: Triton kernels vs the float64 reference, ${#objectives[@]} objectives in parallel"
  for objective in "${objectives[@]}"; do
    (
      begun=$SECONDS
      # Budget 120 s, twice the slowest process: a process's JIT compiles are serial and CPU-bound
      # (~2 s each with the gcc-built launcher; ~91 in all before, in one process); HPD has the most
      # (~20: given and in-kernel y_hat, 4 dtypes/shapes, fused-linear), ~55 s with its startup.
      # Every objective's process runs at once (16 cores): the step takes as long as its slowest.
      timeout 120 "$py" -m bench.gpu_correctness "${correctness_args[@]}" --objective "$objective" \
          >"$work_dir/correctness_$objective.txt" 2>&1
      echo "$? $((SECONDS - begun))" >"$work_dir/correctness_$objective.status"
    ) &
  done
  wait
  : >"$out_dir/gpu_correctness.txt"
  for objective in "${objectives[@]}"; do
    read -r code took <"$work_dir/correctness_$objective.status" || { code=255; took="?"; }
    counts=$(grep -E '^# [0-9]+ passed' "$work_dir/correctness_$objective.txt" | tail -n 1)
    printf '  %-16s %-16s %4s s  %s\n' "$objective" "$(verdict "$code")" "$took" "${counts:-(no summary line)}"
    { echo "=== $objective: exit $code after $took s"; cat "$work_dir/correctness_$objective.txt"; echo; } \
        >>"$out_dir/gpu_correctness.txt"
    [ "$code" -eq 0 ] || status=1
  done
  grep -E '^(FAIL|SKIP)' "$out_dir/gpu_correctness.txt" | head -n 40
  return "$status"
}

main() {
  local started
  started=$SECONDS
  preflight || exit 2
  record_step preflight 0 "$started"

  started=$SECONDS
  correctness
  record_step correctness $? "$started"

  echo "== floors: copy/read bandwidth, a bf16 GEMM, each kernel alone, fused-linear against four GEMMs"
  started=$SECONDS
  # Budget 65 s: startup ~10 s; the bf16 kernels come compiled from the correctness step's cache
  # (15 compiles, ~35 s, if they did not); ~10 s of measuring: 15 kernels x 13 calls of a few ms,
  # the fused-linear step 6 x ~0.1 s, and making [8192, 151936] inputs.
  TRITON_INTERPRET="$floors_interpret" timeout 65 "$py" -m bench.gpu_floors "${floors_args[@]}" --out "$out_dir"
  record_step floors $? "$started"

  echo "== trainer: bf16 autocast with the Triton losses against fp32 (a tiny model)"
  started=$SECONDS
  # Budget 50 s: startup ~10 s, 2 x 20 steps of a tiny model with rollouts (a few s), and the
  # compiles of its V=32 kernels in fp32 and bf16 (~10, ~20 s).
  timeout 50 "$py" -m bench.gpu_trainer_check "${trainer_args[@]}"
  record_step trainer $? "$started"

  echo "== benchmark (reduced): python -m bench ${bench_args[*]}"
  started=$SECONDS
  # Budget 90 s: startup ~10 s; JSD's and HPD's variants at 8192 tokens, ~1-3 s each (~20 s, kernels
  # cached); torch.compile of the HPD reference 10-60 s, run last. The benchmark rewrites its
  # outputs after every measurement: a timeout loses only the measurement it interrupts.
  timeout 90 "$py" -m bench "${bench_args[@]}" --out "$out_dir"
  record_step benchmark $? "$started"

  echo
  echo "== summary ($device$([ "$dry_run" = 1 ] && echo ', dry run'); ${SECONDS} s in all)"
  local index failed=0
  for index in "${!step_names[@]}"; do
    printf '  %-12s %-16s %4s s\n' "${step_names[$index]}" "$(verdict "${step_statuses[$index]}")" \
        "${step_seconds[$index]}"
    [ "${step_statuses[$index]}" -eq 0 ] || failed=1
  done
  echo "  outputs in $out_dir: $(cd "$out_dir" && ls gpu_check_log.txt gpu_correctness.txt gpu_floors.* \
      bench_"$device"_* 2>/dev/null | tr '\n' ' ')"
  [ "$failed" -eq 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK FAILED"
  return "$failed"
}

main 2>&1 | tee "$out_dir/gpu_check_log.txt"
exit "${PIPESTATUS[0]}"
