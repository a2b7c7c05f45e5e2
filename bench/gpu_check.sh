#!/usr/bin/env bash
# GPU check, for a CUDA machine that already has torch and triton (installs nothing, needs no network):
#   1. every objective's Triton kernels against the reference on the GPU (values and gradients,
#      float64 / float32 / bfloat16 at V=151936, fused-linear too): PASS/FAIL lines;
#   2. a few trainer steps with bf16 autocast and the Triton losses, against fp32;
#   3. the benchmark, `python -m bench --device cuda`, on a reduced token list.
# Each step has its own time limit, so the whole script ends within about 9 minutes (typically 4-6).
# Outputs go to "${OUT:-bench/results}": gpu_correctness.txt, bench_cuda_*.{json,md,png} and the log.
#   bash bench/gpu_check.sh            # PYTHON=python3.12 bash bench/gpu_check.sh to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
# The interpreter: $PYTHON, else the first of python3 / python that imports torch.
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      py="$candidate"; break
    fi
  done
fi
[ -n "$py" ] || { echo "no python with torch found; set PYTHON=/path/to/python"; exit 2; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$py" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
try:
    import liger_kernel  # noqa: F401
    print("liger_kernel: installed (its JSD variants will be benchmarked)")
except ImportError:
    print("liger_kernel: not installed (its variants are skipped)")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print(torch.cuda.get_device_name(0))
EOF
[ $? -eq 0 ] || exit 2

echo "== correctness: Triton kernels vs reference (float64 reference)"
timeout 180 "$py" -m bench.gpu_correctness --device cuda 2>&1 | tee "$out_dir/gpu_correctness.txt"
correctness_status=${PIPESTATUS[0]}

echo "== trainer: bf16 autocast with the Triton losses against fp32 (a tiny model)"
timeout 90 "$py" -m bench.gpu_trainer_check 2>&1 | tee "$out_dir/gpu_trainer_check.txt"
trainer_status=${PIPESTATUS[0]}

echo "== benchmark"
# 2048 and 8192 tokens at V=151936, bf16; torch.compile (10-60 s per objective to compile) only for
# HPD and JSD. The benchmark writes its JSON/markdown after every objective, so a timeout keeps
# what was measured.
timeout 360 "$py" -m bench --device cuda --tokens 2048 8192 --repeats 5 --compile-objectives hpd jsd \
    --out "$out_dir" 2>&1 | tee "$out_dir/gpu_bench_log.txt"
bench_status=${PIPESTATUS[0]}

echo "== done: correctness exit $correctness_status (0 = all PASS, 124 = timed out), trainer exit $trainer_status, benchmark exit $bench_status"
[ "$correctness_status" -eq 0 ] && [ "$trainer_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
