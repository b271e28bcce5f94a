#!/usr/bin/env bash
# Wheels for the GPU machine (it has no package registry): DeepSpeed built as a
# pure-Python wheel (its ops compile just in time there) and xformers. DALI's
# CUDA 13 wheel (~199 MB) exceeds what one device call can carry (64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w wheels
.venv/bin/python -m pip download -q --no-deps "xformers==0.0.35" -d wheels
ls -la wheels
