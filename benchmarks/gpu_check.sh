#!/usr/bin/env bash
# The one prepared GPU check: every GPU check and benchmark on one H100/H200,
# results written to the folder given as $1 (summary.txt and results.tgz: the
# device tool brings back at most 8 files, so every log goes into the archive).
#
#   bash benchmarks/gpu_check.sh OUT [STEP ...]
#
# STEPS (the default list first, in this order), each with its timeout:
#   train 180     the real command: deepspeed cimfast/train.py, bf16 + compile, ZeRO-2, micro-batch 128:
#                 base preset 20 steps (90 s), then large 10 steps (90 s). An H200 made 1,275-1,301 img/s
#                 with base on 2026-11-29 (30 steps took 90 s, 60 of them compiling).
#   profile 110   benchmarks/profile_step.py, base preset, synthetic batches: each phase compiled and timed
#                 on its own beside the whole step, FLOPs, graph breaks, kernel time by category
#   switches 100  benchmarks/bench_tokenizer_forms.py: the rewritten tokenizer beside the official form,
#                 then each speed switch (cudnn_benchmark, tokenizer_fuse, tokenizer_io_bf16,
#                 tokenizer_fp8_logits) beside the fast path, with token agreement against fp32
#   kernels 45    kernel benchmarks, each beside its reference (19 s), then the sampler at 5 other launch shapes
#   syncs 80      host syncs per step (torch.cuda.set_sync_debug_mode), with and without overlap_comm (28 + 23 s)
# The default list: 515 s at most, plus ~45 s of installs and set-up: one call with timeout_s 580.
# Not in the default list:
#   setup         only the installs and the configs (a dry run of the set-up path, on any machine)
#   batch 110     profile_step.py at micro-batch 256 (the micro-batch and accumulation choice for one H200)
#   tests 60      GPU tests: compiled Triton kernels against references, attention backends, tokenizer (51 s)
#   finetune 75   bf16 fine-tuning (fused AdamW, mixup, layer decay), then k-NN, on CUDA (fine-tuning 38 s)
#   e2e 100       end to end, plain path against fast path, base preset
#   dali 260      DALI on the GPU: bench_pipelines (torch, DALI CPU, DALI GPU on 500 JPEGs), the pipeline
#                 tests, and the real command on those JPEGs with --pipeline dali-gpu (base preset, 20 steps).
#                 Run it in the call that carries the last DALI part: "bash benchmarks/gpu_check.sh $OUT dali".
#
# The GPU machine has PyTorch, Triton, torchvision and timm but no package
# registry. Bring the rest as wheels in ./wheels (ignored by git), made on a
# CPU machine with:   WITH_DALI=0 bash benchmarks/make_wheels.sh   (~8 MB)
# and carry them: run command "bash benchmarks/gpu_check.sh $OUT", carry ["wheels"], timeout_s 540.
# DALI's CUDA 13 wheel (~199 MB) does not fit one call's carry (64 MiB with the tree):
# make_wheels.sh (WITH_DALI=1) splits it into wheels_dali/part-aa..ad (56 MiB each).
# Carry part-aa, -ab, -ac in three calls back to back (command "true"; ignored files
# stay on a warm machine, and it goes idle after ~30 s), then the last part with the
# DALI step: carry ["wheels", "wheels_dali/part-ad", "wheels_dali/name"], command
# "bash benchmarks/gpu_check.sh $OUT dali". The parts are joined and checked here.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTPUT_DIR [STEP ...]}
shift
KNOWN="setup train profile switches kernels syncs batch tests finetune e2e dali"
STEPS=${*:-train profile switches kernels syncs}
for s in $STEPS; do
  [[ " $KNOWN " == *" $s "* ]] || { echo "gpu_check: unknown step '$s' (known: $KNOWN)" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
W=/tmp/gpu_check && rm -rf $W && mkdir -p $W
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
pack() { tar czf "$OUT/results.tgz" -C $W --exclude='checkpoints' --exclude='*.pt' --exclude='*.safetensors' . 2>/dev/null; }
trap pack EXIT
want() { [[ " $STEPS " == *" $1 "* ]]; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log "steps: $STEPS"
log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" 2>&1 | tee -a "$OUT/summary.txt"

# what the machine lacks, from the carried wheels (no registry there); into the
# interpreter's environment when it is writable, else into /tmp/site
if [ -f wheels_dali/name ] && ls wheels_dali/part-* >/dev/null 2>&1; then
  cat wheels_dali/part-* > "wheels/$(cat wheels_dali/name)" && log "DALI wheel joined from $(ls wheels_dali/part-* | wc -l) parts"
  $PY -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).testzip()" "wheels/$(cat wheels_dali/name)" \
    || { log "DALI wheel incomplete: left out"; rm -f "wheels/$(cat wheels_dali/name)"; }
fi
if ls wheels/*.whl >/dev/null 2>&1; then
  if ! $PY -m pip install -q --no-index --no-deps --no-compile wheels/*.whl > $W/pip.txt 2>&1; then
    log "pip into the environment failed ($(tail -1 $W/pip.txt)); installing into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site wheels/*.whl >> $W/pip.txt 2>&1 \
      || log "installing into /tmp/site failed too ($(tail -1 $W/pip.txt))"
    export PYTHONPATH=$PYTHONPATH:/tmp/site PATH=/tmp/site/bin:$PATH
  fi
fi
# cimfast itself: its kernels/, pipelines/ and configs/ folders become cimfast.kernels, .pipelines, .configs
# through the install's package mapping (pip install -e .). Without a registry pip's build isolation
# cannot fetch setuptools there; then the three folders are copied into this (throwaway) copy's package.
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >> $W/pip.txt 2>&1
if ! $PY -c "import cimfast.kernels, cimfast.pipelines" 2>/dev/null; then
  cp -r kernels cimfast/kernels && cp -r pipelines cimfast/pipelines && cp -r configs cimfast/configs \
    && log "cimfast: kernels/, pipelines/ and configs/ copied into the package"
fi
$PY -c "import cimfast.kernels, cimfast.pipelines; print('cimfast from', cimfast.__file__)" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
DS=$(command -v deepspeed || echo "$(dirname "$(command -v $PY)")/deepspeed")
$PY -c "import deepspeed, xformers; print('deepspeed', deepspeed.__version__, 'xformers', xformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
$PY -m xformers.info > $W/xformers_info.txt 2>&1 || log "xformers not usable (see xformers_info.txt)"
# the base preset's config for train and syncs: DALL-E-architecture tokenizer (random weights: enough
# for throughput), batch 128, the demo photos through the auto pipeline, 20 steps
$PY - <<'PYEOF' >> $W/setup.txt 2>&1
import json
import torch
from cimfast.tokenizer.model import DALLE_SPEC, Tokenizer
from cimfast.tokenizer.files import save_safetensors
torch.manual_seed(0)
save_safetensors(Tokenizer(DALLE_SPEC), "/tmp/dalle_random.safetensors", {"weights": "random, for throughput"})
cfg = json.load(open("configs/ds_vit_base.json"))
cfg["train_batch_size"] = 128
cfg["train_micro_batch_size_per_gpu"] = 128
cfg["scheduler"]["params"]["warmup_num_steps"] = 10
cfg["cimfast"].update(tokenizer_path="/tmp/dalle_random.safetensors", data_path=None, pipeline="auto",
                      max_steps=20, log_interval=10, checkpoint_interval=0, image_interval=0, progress=False)
json.dump(cfg, open("/tmp/ds_gpu_check.json", "w"))
large = json.load(open("configs/ds_vit_large.json"))
large.update(train_batch_size=128, train_micro_batch_size_per_gpu=128)
large.pop("gradient_accumulation_steps", None)
large["scheduler"]["params"]["warmup_num_steps"] = 10
large["cimfast"] = dict(cfg["cimfast"], preset="large", max_steps=10, log_interval=5)
json.dump(large, open("/tmp/ds_gpu_check_large.json", "w"))
PYEOF
pack

if want train; then
  # the real command with the CUDA defaults (bf16, compile, ZeRO-2): base, then large
  for preset in base large; do
    cfg=/tmp/ds_gpu_check.json && [ $preset = large ] && cfg=/tmp/ds_gpu_check_large.json
    log "train: deepspeed cimfast/train.py, $preset preset"
    timeout 90 "$DS" --num_gpus 1 --master_port 29611 cimfast/train.py --ds_config $cfg \
      --output_dir $W/train_$preset > $W/train_$preset.txt 2>&1
    log "train $preset exit $?: $(grep -o 'data pipeline: [^(]*' $W/train_$preset.txt | head -1)"
    tail -1 $W/train_$preset/metrics.jsonl 2>/dev/null | $PY -c \
      "import json,sys; r=json.loads(sys.stdin.read()); print({k: r.get(k) for k in ('step','loss','img_per_s','mfu','data_wait','peak_mem_gb')})" \
      2>&1 | tee -a "$OUT/summary.txt"
    grep -E "Error|error:|Traceback" $W/train_$preset.txt | head -5 | tee -a "$OUT/summary.txt"
    pack
  done
fi

for step in profile batch; do
  want $step || continue
  # each phase of the base step compiled and timed on its own, beside the whole step (compute only:
  # synthetic batches); "batch" at micro-batch 256
  mb=128 && [ $step = batch ] && mb=256
  log "$step: profile_step.py, base preset, micro-batch $mb"
  timeout 110 $PY benchmarks/profile_step.py --preset base --ds_config /tmp/ds_gpu_check.json --micro_batch $mb \
    --pipeline synthetic --steps 5 --warmup 2 --out $W/profile_$mb.json > $W/profile_$mb.txt 2>&1
  log "$step exit $?"
  grep -E "^(tokenize|generator|sample_ce|decode|enhancer|loss|backward|optimizer|data|phase sum|whole step|compile)" \
    $W/profile_$mb.txt | tee -a "$OUT/summary.txt"
  pack
done

if want switches; then
  log "switches: the rewritten tokenizer beside the official form, then each speed switch (batch 128)"
  timeout 30 $PY benchmarks/bench_tokenizer_forms.py --batch 128 --bf16 --repeats 5 --out $W/forms.json \
    > $W/forms.txt 2>&1
  log "forms exit $?"; tail -3 $W/forms.txt | tee -a "$OUT/summary.txt"
  timeout 70 $PY benchmarks/bench_tokenizer_forms.py --switches --compile --batch 128 --repeats 10 \
    --out $W/switches.json > $W/switches.txt 2>&1
  log "switches exit $?"; tail -6 $W/switches.txt | tee -a "$OUT/summary.txt"
  pack
fi

if want tests; then
  # kernels compiled (not interpreted), attention backends, the tokenizer, on CUDA
  log "tests"
  CIMFAST_KERNELS=triton timeout 60 $PY -m pytest -q -rs tests/test_sampling.py tests/test_pixel_loss.py \
    tests/test_models.py tests/test_tokenizer.py "tests/test_guards.py::test_norm_masking_makes_no_cuda_sync" -p no:cacheprovider > $W/tests.txt 2>&1
  log "tests exit $? ($(tail -1 $W/tests.txt))"
  grep -E "^(FAILED|ERROR|SKIPPED)" $W/tests.txt | head -10 | tee -a "$OUT/summary.txt"
  pack
fi

if want finetune; then
  # bf16 fine-tuning (fused AdamW, mixup, layer decay, val top-1) and k-NN features on the device,
  # on small synthetic labelled folders
  log "finetune + evaluate (CUDA)"
  $PY -c "import json; from tests.labelled import make_labelled as m; \
m('/tmp/lab/train', classes=4, per_class=16); m('/tmp/lab/val', classes=4, per_class=4, seed=1); \
c = json.load(open('configs/ds_finetune_vit_base.json')); c.update(train_batch_size=32, train_micro_batch_size_per_gpu=32); \
json.dump(c, open('/tmp/ds_ft_check.json', 'w'))" > $W/finetune_setup.txt 2>&1
  timeout 75 bash -c "\"$DS\" --num_gpus 1 --master_port 29612 cimfast/finetune.py --ds_config /tmp/ds_ft_check.json --model random \
    --train_path /tmp/lab/train --val_path /tmp/lab/val --epochs 2 --output_dir $W/finetune --no-progress \
    --log_interval 1 --num_workers 2 && $PY -m cimfast.evaluate knn --model random --train_path /tmp/lab/train \
    --val_path /tmp/lab/val --num_workers 2 --out $W/knn.json" > $W/finetune.txt 2>&1
  log "finetune + evaluate exit $?: $(grep -h val_top1 $W/finetune/metrics.jsonl 2>/dev/null | tail -1 | cut -c1-300)"
  grep -E "Error|error:|Traceback" $W/finetune.txt | head -5 | tee -a "$OUT/summary.txt"
  pack
fi

if want e2e; then
  # plain path against fast path in the same run (base ran above through the real command)
  log "e2e base batch 64"
  timeout 100 $PY benchmarks/bench_e2e.py --preset base --batch 64 --steps 8 --warmup 2 --out $W \
    > $W/e2e_base.txt 2>&1
  log "e2e base exit $?: $(tail -3 $W/e2e_base.txt | tr '\n' ' ')"
  pack
fi

if want kernels; then
  log "kernel benchmarks"
  timeout 45 $PY -m pytest -q benchmarks/bench_kernels.py -p no:cacheprovider --benchmark-json $W/bench_kernels.json \
    > $W/bench_kernels.txt 2>&1
  log "kernel benchmarks exit $? ($(tail -1 $W/bench_kernels.txt))"
  pack
fi

if want syncs; then
  # PyTorch warns at every synchronizing CUDA call (counted), with the shipped ZeRO-2 config
  # (overlap_comm on: DeepSpeed synchronizes in each backward) and without overlap_comm
  log "sync count (torch.cuda.set_sync_debug_mode warn)"
  $PY -c "import json; c=json.load(open('/tmp/ds_gpu_check.json')); c['zero_optimization']['overlap_comm']=False; \
json.dump(c, open('/tmp/ds_gpu_check_no_overlap.json', 'w'))"
  for v in "" _no_overlap; do
    timeout 40 $PY benchmarks/sync_count.py --ds_config /tmp/ds_gpu_check$v.json --bf16 --steps 6 --cuda_sync_mode warn \
      --no-compile --out $W/syncs$v.json > $W/syncs$v.txt 2>&1
    log "sync count$v exit $?: $(tail -c 400 $W/syncs$v.json 2>/dev/null | tr -d '\n')"
  done
  pack
fi
if want dali; then
  if $PY -c "import nvidia.dali" > $W/dali_import.txt 2>&1; then
    log "dali: pipelines on 500 JPEGs, batch 128, 8 threads"
    timeout 70 $PY benchmarks/bench_pipelines.py --files 500 --batch 128 --threads 8 --batches 10 --rounds 1 \
      --folder /tmp/jpegs --only torch-tv dali-cpu dali-gpu --json $W/pipelines.json > $W/pipelines.txt 2>&1
    log "pipelines exit $?: $(grep -E 'img/s|DALI' $W/pipelines.txt | cut -c1-60 | tr '\n' ';')"
    timeout 60 $PY -m pytest -q -rs tests/test_pipelines.py -p no:cacheprovider > $W/tests_pipelines.txt 2>&1
    log "pipeline tests exit $? ($(tail -1 $W/tests_pipelines.txt))"
    $PY -c "import json; c=json.load(open('/tmp/ds_gpu_check.json')); c['cimfast'].update(data_path='/tmp/jpegs/500', \
pipeline='dali-gpu'); json.dump(c, open('/tmp/ds_gpu_check_dali.json', 'w'))"
    timeout 130 "$DS" --num_gpus 1 --master_port 29613 cimfast/train.py --ds_config /tmp/ds_gpu_check_dali.json \
      --output_dir $W/train_dali > $W/train_dali.txt 2>&1
    log "train with dali-gpu exit $?: $(grep -o 'data pipeline: [^(]*' $W/train_dali.txt | head -1)"
    tail -1 $W/train_dali/metrics.jsonl 2>/dev/null | cut -c1-400 | tee -a "$OUT/summary.txt"
  else
    log "dali: skipped, nvidia.dali does not import ($(tail -1 $W/dali_import.txt))"
  fi
  pack
fi
log "done"
