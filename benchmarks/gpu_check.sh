#!/usr/bin/env bash
# The one prepared GPU check: every GPU test and benchmark, under 8 minutes on
# one H100 (the timeouts below add up to 470 s), results written to the folder
# given as $1.
#
# The GPU machine has PyTorch, Triton, torchvision and timm but no package
# registry. Bring the rest as wheels in ./wheels (ignored by git), made on a
# CPU machine with:   bash benchmarks/make_wheels.sh
# then run it with the device tool:  command "bash benchmarks/gpu_check.sh $OUT", carry ["wheels"].
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTPUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
PY=${PYTHON:-python3}

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$OUT/summary.txt"

# 1. what the machine lacks, from the carried wheels (no registry there)
if ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps wheels/*.whl 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
$PY -m xformers.info > "$OUT/xformers_info.txt" 2>&1 || log "xformers not usable (see xformers_info.txt)"

# 2. GPU tests: kernels compiled (not interpreted), attention backends, the CIM step
log "tests"
CIMFAST_KERNELS=triton timeout 120 $PY -m pytest -q -x tests/test_kernels_sampling.py tests/test_kernels_pixel_loss.py \
  tests/test_models.py tests/test_tokenizer.py -p no:cacheprovider > "$OUT/tests.txt" 2>&1
log "tests exit $? ($(tail -1 "$OUT/tests.txt"))"

# 3. kernel benchmarks, each beside its reference
log "kernel benchmarks"
timeout 90 $PY -m pytest -q benchmarks/bench_kernels.py -p no:cacheprovider --benchmark-json "$OUT/bench_kernels.json" \
  > "$OUT/bench_kernels.txt" 2>&1
log "kernel benchmarks exit $?"

# 4. end to end, plain path against fast path: base, then large
for spec in "base 128" "large 64"; do
  set -- $spec
  log "e2e $1 batch $2"
  timeout 100 $PY benchmarks/bench_e2e.py --preset "$1" --batch "$2" --steps 10 --warmup 3 --out "$OUT" \
    > "$OUT/e2e_$1.txt" 2>&1
  log "e2e $1 exit $?: $(tail -1 "$OUT/e2e_$1.txt")"
done
# 5. peak memory against batch size, with and without activation checkpointing
log "memory table"
timeout 60 $PY benchmarks/bench_memory.py --presets base large --batches 64 128 --out "$OUT" > "$OUT/memory.txt" 2>&1
log "memory exit $?"
log "done"
