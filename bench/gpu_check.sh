#!/usr/bin/env bash
# GPU check, for a CUDA machine that already has torch and triton (installs nothing, needs no network).
# It has to fit one 10-minute call of the device tool with margin; each step has a time limit:
#
#   step          limit (s)  what
#   preflight        45      GPU, python/torch/triton/numpy versions, a C compiler and Python.h, CUDA visible,
#                            what is importable (liger_kernel, trl); 45 s: a cold import of torch + triton and
#                            CUDA's start-up fit in it
#   correctness     105      every objective's kernels against the float64 reference, one process per
#                            objective, all in parallel, and one more at the benchmark's shape (bf16,
#                            N=8192, V=151936: every objective, finite values)
#   floors           60      copy/read bandwidth, a bf16 GEMM, each kernel alone (GB/s, % of copy) next to the
#                            static model for this Triton rescaled to the measured copy bandwidth, finite
#                            outputs, the fused-linear HPD loss against its four-GEMM floor and its grad_W path
#   trainer          45      bf16 autocast trainer steps with the Triton losses against fp32, each step timed
#   benchmark        55      `python -m bench` reduced: JSD and HPD at 8192 tokens (Liger's JSD when it imports)
#   trl              45      `python -m bench.trl_compare`: ours against TRL's Triton chunked divergence, when
#                            trl imports
#   report            5      `python -m bench.gpu_report`: every step's results in one JSON, gpu_check.json
#   total           360      (tests/test_gpu_check.py: the `timeout`s below add up to this, and to <= 360)
#
# Every Triton JIT compile happens once: the steps share one TRITON_CACHE_DIR, and the correctness
# checks compile the bf16 kernels at the specialisation the later steps launch. Python runs unbuffered:
# a step killed by its limit leaves every line it printed.
# Outputs, in "${OUT:-bench/results}" (8 files at most, what the device tool returns):
#   gpu_check.json             every step's results (bench/gpu_report.py says what it holds); written
#                              even when a step failed or timed out, or the preflight stopped the check
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
export PYTHONUNBUFFERED=1  # a step killed by its time limit still leaves every line it printed

if [ "$dry_run" = 1 ]; then
  device=cpu
  correctness_args=(--device cpu --small)          # the torch backend, small shapes
  floors_interpret=1                               # the Triton kernels through the CPU interpreter
  floors_args=(--device cpu --small)
  trainer_args=(--device cpu --steps 6)
  bench_args=(--device cpu --quick --objectives hpd --tokens 64 --variants reference hpd_kernels)
  trl_args=(--device cpu --quick --objectives jsd)
else
  device=cuda
  correctness_args=(--device cuda)
  floors_interpret=0
  floors_args=(--device cuda)
  trainer_args=(--device cuda)
  # 8192 tokens, the floors' shape, so the library's autograd step compares with its kernels alone;
  # torch.compile only for HPD (10-25 s to compile, estimated), and the benchmark runs it last of its objective.
  bench_args=(--device cuda --objectives jsd hpd --tokens 8192 --repeats 3 --warmup 1 --compile-objectives hpd)
  # N=4096, H_s=256, H_t=512, V=32000, float32 (its defaults); the first call of each variant is its cold one
  trl_args=(--device cuda --repeats 3 --warmup 1 --no-empty-cache)
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
record_step() {  # NAME STATUS STARTED_AT LIMIT: for the summary, and steps.tsv for bench/gpu_report.py
  step_names+=("$1"); step_statuses+=("$2"); step_seconds+=($((SECONDS - $3)))
  echo "$1 $2 $((SECONDS - $3)) $4" >>"$work_dir/steps.tsv"
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
  # Budget 45 s: one python start importing torch, triton and hpd_kernels (10-15 s on a warm disk, up to
  # ~30 s cold) and CUDA's start-up (a few s), nvidia-smi and a syntax-only compile of Python.h (~1 s each).
  timeout 45 "$py" - "$device" "$dry_run" "$work_dir/objectives" "$work_dir/preflight.json" <<'EOF'
import importlib.util, json, os, re, shutil, subprocess, sys, sysconfig, tempfile

device, dry_run, objectives_file, fragment = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
problems, facts = [], {"device": device, "gpu": None}
version = lambda text: tuple(int(part) for part in re.findall(r"\d+", text)[:2])
if device == "cuda":
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpus = ""
    print(f"gpu: {gpus or '(no nvidia-smi)'}")
    facts["nvidia_smi"] = gpus or None
import numpy
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numpy {numpy.__version__}")
facts.update(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda, numpy=numpy.__version__)
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    triton = None
    problems.append("triton is not installed")
facts["triton"] = triton and triton.__version__
try:
    import liger_kernel  # noqa: F401
    print("liger_kernel: installed (its JSD variants will be benchmarked)")
except ImportError:
    liger_kernel = None
    print("liger_kernel: not installed (its variants are skipped)")
# trl is found, not imported (it imports transformers: seconds); its own step imports it.
has_trl = importlib.util.find_spec("trl") is not None
print(f"trl: {'installed (compared with its ChunkedDivergenceFunction)' if has_trl else 'not installed (not compared)'}")
facts["importable"] = {"liger_kernel": liger_kernel is not None, "trl": has_trl}

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
facts["c_compiler"], facts["python_include"] = compiler_path, include

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
        facts["gpu"] = {"name": properties.name, "sm": f"{properties.major}{properties.minor}",
                        "memory_gib": round(properties.total_memory / 2**30, 1)}
    else:
        problems.append("torch sees no CUDA device")

from bench.workloads import BENCHMARKED_OBJECTIVES  # imports hpd_kernels and its reference: they must import here too
with open(objectives_file, "w") as handle:
    handle.write(" ".join(BENCHMARKED_OBJECTIVES))
for problem in problems:
    print(f"PREFLIGHT FAILED: {problem}")
with open(fragment, "w") as handle:
    json.dump(dict(facts, problems=problems), handle, indent=1)
sys.exit(2 if problems else 0)
EOF
  local status=$?
  [ "$status" -eq 0 ] || { echo "preflight: exit $status; nothing else runs"; return 2; }
}

correctness() {
  local objectives process code took counts status=0
  if [ -n "${GPU_CHECK_OBJECTIVES:-}" ]; then
    read -r -a objectives <<<"$GPU_CHECK_OBJECTIVES"
  else
    read -r -a objectives <"$work_dir/objectives"
  fi
  echo "== correctness: Triton kernels vs the float64 reference, ${#objectives[@]} objectives in parallel," \
       "and every objective at the benchmark's shape"
  for process in "${objectives[@]}" benchmark_shape; do
    (
      begun=$SECONDS
      if [ "$process" = benchmark_shape ]; then
        what=(--benchmark-shape --objectives "${objectives[@]}")
      else
        what=(--objective "$process")
      fi
      # Budget 105 s, twice the slowest process: a process's JIT compiles are serial and CPU-bound
      # (~2 s each with the gcc-built launcher; ~91 in all before, in one process); HPD has the most
      # (~20: given and in-kernel y_hat, 4 dtypes/shapes, fused-linear), ~55 s with its startup. The
      # benchmark shape's process: ~8 GB of bf16 inputs and gradient, its kernels from the others' cache
      # (or ~20 compiles), the float64 reference 256 rows at a time (a few s on the GPU).
      # Every process runs at once (16 cores): the step takes as long as its slowest.
      timeout 105 "$py" -m bench.gpu_correctness "${correctness_args[@]}" "${what[@]}" \
          --json "$work_dir/correctness_$process.json" >"$work_dir/correctness_$process.txt" 2>&1
      echo "$? $((SECONDS - begun))" >"$work_dir/correctness_$process.status"
    ) &
  done
  wait
  : >"$out_dir/gpu_correctness.txt"
  for process in "${objectives[@]}" benchmark_shape; do
    read -r code took <"$work_dir/correctness_$process.status" || { code=255; took="?"; }
    counts=$(grep -E '^# [0-9]+ passed' "$work_dir/correctness_$process.txt" | tail -n 1)
    printf '  %-16s %-16s %4s s  %s\n' "$process" "$(verdict "$code")" "$took" "${counts:-(no summary line)}"
    { echo "=== $process: exit $code after $took s"; cat "$work_dir/correctness_$process.txt"; echo; } \
        >>"$out_dir/gpu_correctness.txt"
    [ "$code" -eq 0 ] || status=1
  done
  grep -E '^(FAIL|SKIP)' "$out_dir/gpu_correctness.txt" | head -n 40
  return "$status"
}

trl() {
  if ! grep -q '"trl": true' "$work_dir/preflight.json" 2>/dev/null; then
    echo "trl is not installed: not compared"
    return 0
  fi
  # Budget 45 s: startup with trl (it imports transformers, ~10 s), the agreement check on 256 rows, then
  # forward KL, JSD and reverse KL for both sides, 1 cold + 3 timed calls of ~10 ms each, and TRL's and
  # our fused-linear kernels' compiles (~2 s each; ours mostly cached). It writes its outputs after every
  # measurement: a timeout loses only the one it interrupts. (The dry run, --quick JSD on 2 busy CPU
  # cores: ~20-30 s, forked measuring processes included.)
  timeout 45 "$py" -m bench.trl_compare "${trl_args[@]}" --out "$work_dir/trl"
}

report() {
  echo "== report: every step's results in $out_dir/gpu_check.json"
  # Budget 5 s: the standard library only (no torch), reading a few JSON files.
  timeout 5 "$py" -m bench.gpu_report --work "$work_dir" --out "$out_dir" --device "$device" \
      $([ "$dry_run" = 1 ] && echo --dry-run)
}

summary() {
  echo
  echo "== summary ($device$([ "$dry_run" = 1 ] && echo ', dry run'); ${SECONDS} s in all)"
  local index failed=0
  for index in "${!step_names[@]}"; do
    printf '  %-12s %-16s %4s s\n' "${step_names[$index]}" "$(verdict "${step_statuses[$index]}")" \
        "${step_seconds[$index]}"
    [ "${step_statuses[$index]}" -eq 0 ] || failed=1
  done
  echo "  outputs in $out_dir: $(cd "$out_dir" && ls gpu_check.json gpu_check_log.txt gpu_correctness.txt \
      gpu_floors.* bench_"$device"_* 2>/dev/null | tr '\n' ' ')"
  [ "$failed" -eq 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK FAILED"
  return "$failed"
}

main() {
  local started status
  started=$SECONDS
  preflight
  status=$?
  record_step preflight "$status" "$started" 45
  if [ "$status" -ne 0 ]; then
    started=$SECONDS; report; record_step report $? "$started" 5
    exit 2
  fi

  started=$SECONDS
  correctness
  record_step correctness $? "$started" 105

  echo "== floors: copy/read bandwidth, a bf16 GEMM, each kernel alone, fused-linear against four GEMMs"
  started=$SECONDS
  # Budget 60 s: startup ~10 s; the bf16 kernels come compiled from the correctness step's cache
  # (15 compiles, ~35 s, if they did not); ~10 s of measuring: 15 kernels x 14 calls of a few ms
  # (the last one's outputs checked finite), the fused-linear step 7 x ~0.1 s, and making
  # [8192, 151936] inputs.
  TRITON_INTERPRET="$floors_interpret" timeout 60 "$py" -m bench.gpu_floors "${floors_args[@]}" --out "$out_dir"
  record_step floors $? "$started" 60

  echo "== trainer: bf16 autocast with the Triton losses against fp32 (a tiny model)"
  started=$SECONDS
  # Budget 45 s: startup ~10 s, 2 x 20 steps of a tiny model with rollouts (a few s), and the
  # compiles of its V=32 kernels in fp32 and bf16 (~10, ~20 s).
  timeout 45 "$py" -m bench.gpu_trainer_check "${trainer_args[@]}" --json "$work_dir/trainer.json"
  record_step trainer $? "$started" 45

  echo "== benchmark (reduced): python -m bench ${bench_args[*]}"
  started=$SECONDS
  # Budget 55 s: startup ~10 s; JSD's and HPD's variants at 8192 tokens, ~1-3 s each (~20 s, kernels
  # cached); torch.compile of the HPD reference 10-25 s, run last. The benchmark rewrites its
  # outputs after every measurement: a timeout loses only the measurement it interrupts.
  timeout 55 "$py" -m bench "${bench_args[@]}" --out "$out_dir"
  record_step benchmark $? "$started" 55

  echo "== trl: python -m bench.trl_compare ${trl_args[*]}"
  started=$SECONDS
  trl
  record_step trl $? "$started" 45

  started=$SECONDS
  report
  record_step report $? "$started" 5
  summary
}

main 2>&1 | tee "$out_dir/gpu_check_log.txt"
exit "${PIPESTATUS[0]}"
