#!/usr/bin/env bash
# The one test command: sets up everything on a fresh machine, then runs the whole suite.
#   bash scripts/test.sh [pytest args...]
# scripts/setup_env.sh makes .venv (CPU torch when no GPU is visible, the package with its test
# extra); the Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
exec "${HPD_VENV:-.venv}/bin/python" -m pytest "$@"
