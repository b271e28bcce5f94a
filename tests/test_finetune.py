"""Fine-tuning through the DeepSpeed launcher, as users run it: mixup, layer
decay (the per-group learning rates against the formula), val top-1, exact resume."""
import json
import math
import os
import subprocess
import sys

import pytest

from cimfast.engine.metrics import read_metrics
from tests.labelled import make_labelled
from tests.test_signals import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
BASE_LR, DECAY, WARMUP, TOTAL, DEPTH = 1e-3, 0.65, 2, 20, 4  # DEPTH: the tiny preset's enhancer


def config(tmp, **cim):
    with open(os.path.join(ROOT, "configs", "ds_finetune_vit_base.json")) as f:
        cfg = json.load(f)
    cfg.update(train_batch_size=8, train_micro_batch_size_per_gpu=4, bf16={"enabled": False},
               zero_optimization={"stage": 1})
    cfg["optimizer"]["params"]["lr"] = BASE_LR
    cfg["scheduler"]["params"].update(total_num_steps=TOTAL, warmup_num_steps=WARMUP, cos_min_ratio=0.0)
    cfg["cimfast"].update(model="random", preset="tiny", epochs=None, max_steps=6, log_interval=1,
                          checkpoint_interval=3, eval_interval=3, num_workers=1, progress=False,
                          train_path=make_labelled(os.path.join(tmp, "train"), per_class=8),
                          val_path=make_labelled(os.path.join(tmp, "val"), per_class=3, seed=1), **cim)
    path = os.path.join(tmp, "ft.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def launch(args, port):
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           os.path.join(ROOT, "cimfast", "finetune.py")]
    return subprocess.run(cmd + args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


def ratio(step):
    """DeepSpeed's WarmupCosineLR (linear warmup) after ``step`` optimizer steps."""
    it = step - 1
    if it < WARMUP:
        return it / WARMUP
    return (1 + math.cos(math.pi * min(1.0, (it - WARMUP + 1) / (TOTAL - WARMUP)))) / 2


def test_help():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "finetune.py"), "--help"], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--layer_decay" in r.stdout and "--mixup" in r.stdout
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "--data_path" not in text and "--pipeline" not in text  # pre-training's, refused here
    assert "data order, augmentation, mixup/cutmix draws" in text and "outputs/finetune)" in text


def test_finetune_mixup_layer_decay_val_top1_and_exact_resume(tmp_path):
    cfg = config(str(tmp_path), mixup=0.8, cutmix=1.0, drop_path=0.1, layer_decay=DECAY)
    full = str(tmp_path / "full")
    r = launch(["--ds_config", cfg, "--output_dir", full], _free_port())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = read_metrics(full)
    train = {x["step"]: x for x in recs if "loss" in x}
    assert sorted(train) == list(range(1, 7))
    for step, x in train.items():
        # the head's group keeps the base lr, the patch embedding's is decayed DEPTH + 1 times
        assert x["lr_max"] == pytest.approx(BASE_LR * ratio(step), rel=1e-6, abs=1e-12)
        assert x["lr_min"] == pytest.approx(x["lr_max"] * DECAY ** (DEPTH + 1), rel=1e-6, abs=1e-12)
        assert math.isfinite(x["loss"])
    val = {x["step"]: x for x in recs if "val_top1" in x}
    assert sorted(val) == [3, 6] and all(0 <= v["val_top1"] <= 100 for v in val.values())

    part = str(tmp_path / "part")
    r = launch(["--ds_config", cfg, "--output_dir", part, "--max_steps", "3"], _free_port())
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(["--ds_config", cfg, "--output_dir", part, "--resume", "auto"], _free_port())
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = {x["step"]: x["loss"] for x in read_metrics(part) if "loss" in x}
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):  # same augmentations, mixing, drop path and data order after the resume
        assert resumed[step] == pytest.approx(train[step]["loss"], rel=1e-5), step
    assert {x["step"]: x["val_top1"] for x in read_metrics(part) if "val_top1" in x} == \
        {s: v["val_top1"] for s, v in val.items()}
    # resumed once more, finished: nothing trained, saved or evaluated (its length comes from the
    # run's settings, so the check is the training loop's, after set-up)
    before = read_metrics(part)
    r = launch(["--ds_config", cfg, "--output_dir", part, "--resume", "auto"], _free_port())
    assert r.returncode == 0 and "nothing left to train" in r.stdout + r.stderr, r.stderr[-3000:]
    assert read_metrics(part) == before


def test_resnet50_recipe_runs_with_timm_lamb_and_bce(tmp_path):
    """The RSB A2 config's pieces (timm's LAMB as DeepSpeed's client optimizer, binary
    cross-entropy with mixed targets) on a ResNet-50 at 64 px, one rank under plain python."""
    with open(os.path.join(ROOT, "configs", "ds_finetune_resnet50.json")) as f:
        cfg = json.load(f)
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, bf16={"enabled": False})
    cfg["scheduler"]["params"].update(total_num_steps=TOTAL, warmup_num_steps=WARMUP, cos_min_ratio=0.0)
    cfg["cimfast"].update(model="random", preset="resnet50", epochs=None, max_steps=3, log_interval=1, img_size=64,
                          checkpoint_interval=0, num_workers=0, progress=False, output_dir=str(tmp_path / "out"),
                          train_path=make_labelled(str(tmp_path / "train"), per_class=4),
                          val_path=make_labelled(str(tmp_path / "val"), per_class=2, seed=1))
    path = str(tmp_path / "r50.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "finetune.py"), "--ds_config", path], env=ENV,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(str(tmp_path / "out"))
    train = [x for x in recs if "loss" in x]
    assert len(train) == 3 and all(math.isfinite(x["loss"]) for x in train)
    assert train[-1]["lr_max"] == pytest.approx(5e-3 * ratio(3)) and train[-1]["lr_min"] == train[-1]["lr_max"]
    assert [x["step"] for x in recs if "val_top1" in x] == [3]
    # its checkpoint holds a whole classifier: the pre-training tools name it instead of crashing
    out = str(tmp_path / "out")
    for cmd in (["-m", "cimfast.export", out, str(tmp_path / "x.safetensors")],
                ["-m", "cimfast.evaluate", "knn", "--model", out, "--train_path", "demo", "--val_path", "demo"]):
        r = subprocess.run([sys.executable, *cmd], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "is a checkpoint of fine-tuning" in r.stderr and "Traceback" not in r.stderr, \
            r.stderr[-2000:]


def test_bf16_engine_trains_and_evaluates(tmp_path):
    """The CUDA default precision (a bf16 engine: inputs cast to the weights' dtype, val in bf16) on the CPU."""
    cfg_path = config(str(tmp_path), mixup=0.8, cutmix=1.0)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["bf16"] = {"enabled": True}
    cfg["cimfast"].update(max_steps=3, eval_interval=None, num_workers=0, output_dir=str(tmp_path / "out"))
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "finetune.py"), "--ds_config", cfg_path],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(str(tmp_path / "out"))
    assert [x["step"] for x in recs if "loss" in x] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in recs if "loss" in x)
    assert [x["step"] for x in recs if "val_top1" in x] == [3]


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    """RandAugment's increasing posterize draws 0 bits at high magnitudes; Pillow 13 refuses
    0 bits, and the recipe's first batches died of it."""
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment

    from cimfast.finetune import FinetuneConfig, train_transform

    train_transform(FinetuneConfig(train_path="x", val_path="y"), 32)
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - 4 = 0 bits
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0
    assert np.asarray(auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img)).max() > 0
