#!/usr/bin/env bash
# The one prepared GPU check: every GPU check and benchmark, under 8 minutes on
# one H100/H200 (the timeouts below add up to 465 s), results written to the
# folder given as $1.
#
# The GPU machine has PyTorch, Triton, torchvision and timm but no package
# registry. Bring the rest as wheels in ./wheels (ignored by git), made on a
# CPU machine with:   bash benchmarks/make_wheels.sh
# DeepSpeed and xformers fit one device call's carry (64 MiB); DALI's CUDA 13
# wheel (~199 MB) does not: make_wheels.sh splits it into wheels_dali/part-*
# (60 MB each), carried one per call ("carry": ["wheels_dali/part-aa"], then
# -ab, -ac, -ad; command "true") back to back while the machine stays warm.
# Then run: command "bash benchmarks/gpu_check.sh $OUT", carry ["wheels", "wheels_dali/name"].
# The parts are joined and installed when all of them arrived.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTPUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
PY=${PYTHON:-python3}
BIN=$(dirname "$(command -v $PY)")

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$OUT/summary.txt"

# 1. what the machine lacks, from the carried wheels (no registry there)
if [ -f wheels_dali/name ] && ls wheels_dali/part-* >/dev/null 2>&1; then
  cat wheels_dali/part-* > "wheels/$(cat wheels_dali/name)" && log "DALI wheel joined from $(ls wheels_dali/part-* | wc -l) parts"
  $PY -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).testzip()" "wheels/$(cat wheels_dali/name)" \
    || { log "DALI wheel incomplete: left out"; rm -f "wheels/$(cat wheels_dali/name)"; }
fi
if ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps wheels/*.whl 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
$PY -m xformers.info > "$OUT/xformers_info.txt" 2>&1 || log "xformers not usable (see xformers_info.txt)"

# 2. the real command first: deepspeed cimfast/train.py, base preset, DALL-E-architecture tokenizer
#    (random weights: enough for throughput), bf16 + compile (the CUDA defaults), 30 steps
log "train: deepspeed cimfast/train.py, base preset"
$PY - <<'EOF' >> "$OUT/summary.txt" 2>&1
import json
import torch
from cimfast.tokenizer import DALLE_SPEC, Tokenizer
from cimfast.tokenizer_files import save_safetensors
torch.manual_seed(0)
save_safetensors(Tokenizer(DALLE_SPEC), "/tmp/dalle_random.safetensors", {"weights": "random, for throughput"})
cfg = json.load(open("configs/ds_vit_base.json"))
cfg["train_batch_size"] = 128
cfg["train_micro_batch_size_per_gpu"] = 128
cfg["scheduler"]["params"]["warmup_num_steps"] = 10
cfg["cimfast"].update(tokenizer_path="/tmp/dalle_random.safetensors", data_path=None, pipeline="auto",
                      max_steps=30, log_interval=10, checkpoint_interval=0, image_interval=0, progress=False)
json.dump(cfg, open("/tmp/ds_gpu_check.json", "w"))
EOF
timeout 150 "$BIN/deepspeed" --num_gpus 1 --master_port 29611 cimfast/train.py --ds_config /tmp/ds_gpu_check.json \
  --output_dir "$OUT/train_base" > "$OUT/train_base.txt" 2>&1
log "train exit $?: $(grep -o 'data pipeline: [^(]*' "$OUT/train_base.txt" | head -1)"
tail -1 "$OUT/train_base/metrics.jsonl" 2>/dev/null | $PY -c \
  "import json,sys; r=json.loads(sys.stdin.read()); print({k: r.get(k) for k in ('step','loss','img_per_s','mfu','data_wait','peak_mem_gb')})" \
  2>&1 | tee -a "$OUT/summary.txt"

# 3. host syncs in the step: PyTorch warns at every synchronizing CUDA call (counted), with the
#    shipped ZeRO-2 config (overlap_comm on: DeepSpeed synchronizes in each backward) and without overlap_comm
log "sync count (torch.cuda.set_sync_debug_mode warn)"
$PY -c "import json; c=json.load(open('/tmp/ds_gpu_check.json')); c['zero_optimization']['overlap_comm']=False; \
json.dump(c, open('/tmp/ds_gpu_check_no_overlap.json', 'w'))"
for v in "" _no_overlap; do
  timeout 50 $PY benchmarks/sync_count.py --ds_config /tmp/ds_gpu_check$v.json --bf16 --steps 6 --cuda_sync_mode warn --no-compile \
    --out "$OUT/syncs$v.json" > "$OUT/syncs$v.txt" 2>&1
  log "sync count$v exit $?: $(tail -c 400 "$OUT/syncs$v.json" 2>/dev/null | tr -d '\n')"
done

# 4. GPU tests: kernels compiled (not interpreted), attention backends, the CIM step
log "tests"
CIMFAST_KERNELS=triton timeout 60 $PY -m pytest -q -x tests/test_sampling.py tests/test_pixel_loss.py \
  tests/test_models.py tests/test_tokenizer.py -p no:cacheprovider > "$OUT/tests.txt" 2>&1
log "tests exit $? ($(tail -1 "$OUT/tests.txt"))"

# 5. kernel benchmarks, each beside its reference
log "kernel benchmarks"
timeout 45 $PY -m pytest -q benchmarks/bench_kernels.py -p no:cacheprovider --benchmark-json "$OUT/bench_kernels.json" \
  > "$OUT/bench_kernels.txt" 2>&1
log "kernel benchmarks exit $?"

# 6. end to end, plain path against fast path: large (base ran above through the real command)
log "e2e large batch 64"
timeout 65 $PY benchmarks/bench_e2e.py --preset large --batch 64 --steps 10 --warmup 3 --out "$OUT" \
  > "$OUT/e2e_large.txt" 2>&1
log "e2e large exit $?: $(tail -1 "$OUT/e2e_large.txt")"
# 7. evaluation on CUDA: bf16 fine-tuning (fused AdamW, mixup, layer decay, val top-1) and k-NN features on
#    the device, on small synthetic labelled folders (no scikit-learn needed)
log "finetune + evaluate (CUDA)"
$PY -c "import json, sys; sys.path.insert(0, '.'); from tests.labelled import make_labelled as m; \
m('/tmp/lab/train', classes=4, per_class=16); m('/tmp/lab/val', classes=4, per_class=4, seed=1); \
c = json.load(open('configs/ds_finetune_vit_base.json')); c.update(train_batch_size=32, train_micro_batch_size_per_gpu=32); \
json.dump(c, open('/tmp/ds_ft_check.json', 'w'))"
timeout 55 bash -c "\"$BIN/deepspeed\" --num_gpus 1 --master_port 29612 cimfast/finetune.py --ds_config /tmp/ds_ft_check.json --model random \
  --train_path /tmp/lab/train --val_path /tmp/lab/val --epochs 2 --output_dir \"$OUT/finetune\" --no-progress \
  --log_interval 1 --num_workers 2 && $PY -m cimfast.evaluate knn --model random --train_path /tmp/lab/train \
  --val_path /tmp/lab/val --num_workers 2 --out \"$OUT/knn.json\"" > "$OUT/finetune.txt" 2>&1
log "finetune + evaluate exit $?: $(grep -h val_top1 "$OUT/finetune/metrics.jsonl" 2>/dev/null | tail -1)"
log "done"
