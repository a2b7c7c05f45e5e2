#!/usr/bin/env bash
# The one test command: sets up everything on a fresh machine, then runs the whole suite.
#   bash scripts/test.sh [pytest args...]
# - a virtual environment in .venv (override with HPD_VENV=path);
# - the CPU build of PyTorch when no NVIDIA GPU is visible (an unpinned torch would pull the
#   multi-GB CUDA build), then the package with its test extra;
# - the Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${HPD_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==2.13.0"   # the CPU build on these machines
  fi
fi
pip_install -e ".[test]"
export TRITON_INTERPRET=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "$py" -m pytest "$@"
