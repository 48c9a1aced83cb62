#!/usr/bin/env bash
# Create .venv (if needed) with the pinned PyTorch and ewc_reg plus its dev and bench extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Pin torch/torchvision first so that no extra can pull another torch.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]" \
  "torch==2.14.1" "torchvision==0.29.1"
