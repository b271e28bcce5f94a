#!/usr/bin/env bash
# Installs cimfast and everything its tests need into ./.venv (idempotent).
# TORCH_SPEC chooses the torch build (default: the one CI uses; on a GPU
# machine that already has torch, set TORCH_SPEC=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q -U pip
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ "$TORCH_SPEC" != skip ] && ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  $PIP install -q $TORCH_SPEC
fi
# DeepSpeed is a source distribution: build it against the torch above, with
# its C++/CUDA ops compiled just in time when first used.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.16"
fi
# DALI: the build for CUDA 13 (torch 2.14 here); it also runs CPU-only.
$PIP install -q --no-build-isolation -e ".[dev,dali-cuda13]"
