#!/usr/bin/env bash
# Wheels for the GPU machine (it has no package registry): DeepSpeed built as a
# pure-Python wheel (its ops compile just in time there), xformers, and DALI's
# CUDA 13 wheel split into parts in wheels_dali/: one device call carries at
# most 64 MiB, the DALI wheel is ~199 MB. Carry each wheels_dali/part-* in its
# own call while the machine stays warm (files carried before stay there),
# then run gpu_check.sh carrying ["wheels", "wheels_dali/name"]; it joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w wheels
# DeepSpeed's needs that the GPU machine's image lacks (pydantic's compiled core for its Python, 3.12)
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
.venv/bin/python -m pip download -q $P -d wheels hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5
# xformers 0.0.35: on the H200 (torch 2.11+cu130) it imported but ran no attention (built for torch
# 2.10+cu128, no CUDA operators of its own), and training fell back to SDPA; carried to keep checking that
.venv/bin/python -m pip download -q $P -d wheels "xformers==0.0.35"
if [ "${WITH_DALI:-1}" = 1 ]; then
  rm -rf wheels_dali && mkdir -p wheels_dali/dl
  .venv/bin/python -m pip download -q --no-deps "nvidia-dali-cuda130==2.4.0" -d wheels_dali/dl
  whl=$(ls wheels_dali/dl/*.whl | head -1)
  basename "$whl" > wheels_dali/name
  split -b 56m "$whl" wheels_dali/part-
  rm -rf wheels_dali/dl
fi
ls -la wheels wheels_dali 2>/dev/null
