"""What the quickstart stands on (the crop-scale setting, the demo digits' train
split as pre-training data) and what it shows: the README's command, run in
full, ends with its k-NN monitor above its own step-0 value."""
import os
import shlex
import subprocess
import sys

import pytest

from cimfast.config.cli import parse
from cimfast.config.preflight import check_run
from cimfast.config.settings import ConfigError, InputError, RunConfig
from cimfast.engine.data import build_image_dataset
from cimfast.engine.metrics import read_metrics
from cimfast.pipelines.views import SCALE, sample_crop
from tests.runs import ROOT, free_port

DEMO = os.path.join(ROOT, "configs", "ds_demo.json")


def _areas(scale, n=300, h=90, w=120):
    return [ch * cw / (h * w) for _, _, ch, cw, _ in (sample_crop(0, 0, i, h, w, scale) for i in range(n))]


def test_crop_scale_bounds_the_crop_and_the_default_is_unchanged():
    areas = _areas((0.5, 1.0))
    assert min(areas) > 0.48 and min(areas) < 0.6  # rounding to whole pixels: a little under the bound
    default = _areas(SCALE)
    assert SCALE == (0.08, 1.0) and min(default) < 0.15  # torchvision's and the paper's range, kept
    assert [sample_crop(3, 1, i, 90, 120) for i in range(20)] == [sample_crop(3, 1, i, 90, 120, (0.08, 1.0))
                                                                  for i in range(20)]


def test_crop_scale_is_a_validated_setting():
    assert RunConfig().crop_scale == (0.08, 1.0)
    _, run, _, _ = parse(["--ds_config", DEMO, "--crop_scale", "0.3", "1"])
    assert run.crop_scale == (0.3, 1.0)
    for bad in (["0.5"], ["0.9", "0.5"], ["0", "1"], ["0.5", "1.5"]):
        with pytest.raises(ConfigError, match="crop_scale"):
            parse(["--ds_config", DEMO, "--crop_scale", *bad])
    from cimfast.finetune import GROUPS, UNUSED

    with pytest.raises(ConfigError, match="--crop_scale: not a setting"):  # fine-tuning crops with timm's transform
        parse(["--ds_config", os.path.join(ROOT, "configs", "ds_finetune_vit_base.json"), "--crop_scale", "0.5", "1"],
              GROUPS, unused=UNUSED)


def test_demo_digits_data_path_is_their_train_split_only(tmp_path):
    out = str(tmp_path / "out")  # not the default folder, which a quickstart run may have filled
    run = RunConfig(data_path="demo:digits", cache_dir=str(tmp_path), crop_scale=(0.5, 1.0), output_dir=out)
    run.validate()
    check_run(run, "cim")  # no folder of that name needed
    ds = build_image_dataset(run, 32, 16, None)
    names = {int(os.path.basename(f)[:4]) for f in ds.files}
    assert len(ds.files) == 1347 and all(i % 4 for i in names)  # every 4th digit is in val: never trained on
    assert ds.scale == (0.5, 1.0) and ds[(0, 0)]["images"].shape == (3, 32, 32)
    with pytest.raises(InputError, match="demo:digits"):
        check_run(RunConfig(data_path="demo:digit", cache_dir=str(tmp_path), output_dir=out), "cim")
    photos = RunConfig(data_path="demo:photos", demo_samples=5, output_dir=out)  # the photographs, as no data path
    check_run(photos, "cim")
    assert type(build_image_dataset(photos, 32, 16, None)).__name__ == "DemoDataset"


# benchmarks/learning.py over seeds 0-4 of the shipped quickstart (benchmarks/RESULTS.md, "What
# the quickstart learns"): k-NN gains 11.3, 9.3, 9.8, 10.7, 15.1 points; the floor is their mean
# less three standard deviations
GAIN_MEAN, GAIN_SD = 11.24, 2.30
GAIN_FLOOR = GAIN_MEAN - 3 * GAIN_SD  # 4.34


def test_the_readme_quickstart_learns_above_the_floor(tmp_path):
    """The README's quickstart command, as shipped (its seed, steps, data): its enhancer's
    last k-NN top-1 beats the run's own step-0 value by more than the floor."""
    from tests.test_docs import COMMANDS

    line = next(c for page, c in COMMANDS if page == "README.md" and "deepspeed" in c)
    tokens = shlex.split(line)
    launcher = os.path.join(os.path.dirname(sys.executable), os.path.basename(tokens[0]))
    out = tmp_path / "out"
    cmd = [launcher, "--master_port", free_port(), *tokens[1:], "--output_dir", str(out), "--no-progress",
           "--cache_dir", str(tmp_path / "cache")]
    # the CPU path, with its 2 threads, as the floor was measured (a GPU's sums take another path)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    records = read_metrics(str(out))
    init = [x for x in records if "knn_top1_init" in x]
    knn = [x for x in records if "knn_top1" in x]
    assert len(init) == 1 and init[0]["step"] == 0, init  # measured once, before any update
    assert knn[-1]["step"] == 800 and knn[-1]["knn_top1_gain"] == pytest.approx(
        knn[-1]["knn_top1"] - init[0]["knn_top1_init"])
    assert knn[-1]["knn_top1_gain"] > GAIN_FLOOR, [(x["step"], x["knn_top1"]) for x in knn]
    closing = f"done: step 800, knn_top1 {knn[-1]['knn_top1']:.1f} ({knn[-1]['knn_top1_gain']:+.1f} over step 0)"
    assert closing in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]
    assert os.path.isfile(out / "loss.png") and os.path.isfile(out / "picture_final.png")


def test_the_pictures_batch_spans_the_classes(tmp_path):
    """The digits' files come class by class: the first 8 were all zeros."""
    from cimfast.engine.data import fixed_batch

    run = RunConfig(data_path="demo:digits", cache_dir=str(tmp_path), crop_scale=(0.5, 1.0))
    ds = build_image_dataset(run, 32, 16, None)
    asked = []

    class Recording:
        def __len__(self):
            return len(ds)

        def __getitem__(self, key):
            asked.append(key[1])
            return ds[key]

    assert fixed_batch(Recording(), 8)["images"].shape[0] == 8
    classes = {os.path.basename(os.path.dirname(ds.files[i])) for i in asked}
    assert len(classes) >= 6, [ds.files[i] for i in asked]
