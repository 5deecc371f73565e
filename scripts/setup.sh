#!/usr/bin/env bash
# Creates .venv and installs mmcore with the given extras (default: none).
# Torch: MMCORE_TORCH (default torch==2.13.0, the CPU wheel on the project's
# machines) is installed first, so no CUDA build of several GB is pulled in; set
# MMCORE_TORCH="" to keep a torch that is already in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
torch_spec="${MMCORE_TORCH-torch==2.13.0}"
if [ -n "$torch_spec" ]; then
  .venv/bin/python -m pip install -q "$torch_spec"
fi
target="."
if [ -n "$extras" ]; then
  target=".[$extras]"
fi
.venv/bin/python -m pip install -q "$target"
