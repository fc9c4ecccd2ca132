#!/usr/bin/env bash
# Creates .venv in the repository root and installs kepo with its CPU dependencies.
# torch is pinned in the same install so pip takes the CPU build instead of a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${KEPO_TORCH_VERSION:-2.13.0}" -e ".[dev${KEPO_EXTRAS:+,$KEPO_EXTRAS}]"
echo "kepo installed in .venv ($(.venv/bin/python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)'))"
