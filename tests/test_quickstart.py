"""What the quickstart stands on: the crop-scale setting and the demo digits'
train split as pre-training data."""
import os

import pytest

from cimfast.config.cli import parse
from cimfast.config.preflight import check_run
from cimfast.config.settings import ConfigError, InputError, RunConfig
from cimfast.engine.data import build_image_dataset
from cimfast.pipelines.views import SCALE, sample_crop
from tests.runs import ROOT

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
    run = RunConfig(data_path="demo:digits", cache_dir=str(tmp_path), crop_scale=(0.5, 1.0))
    run.validate()
    check_run(run, "cim")  # no folder of that name needed
    ds = build_image_dataset(run, 32, 16, None)
    names = {int(os.path.basename(f)[:4]) for f in ds.files}
    assert len(ds.files) == 1347 and all(i % 4 for i in names)  # every 4th digit is in val: never trained on
    assert ds.scale == (0.5, 1.0) and ds[(0, 0)]["images"].shape == (3, 32, 32)
    with pytest.raises(InputError, match="demo:digits"):
        check_run(RunConfig(data_path="demo:digit", cache_dir=str(tmp_path)), "cim")
    photos = RunConfig(data_path="demo:photos", demo_samples=5)  # the photographs, as no data path
    check_run(photos, "cim")
    assert type(build_image_dataset(photos, 32, 16, None)).__name__ == "DemoDataset"
