"""Input pipelines: DALI (CPU), the torch DataLoader path, validation, synthetic
batches and the choice between them. Small shapes: the CPU is shared."""
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cimfast.config.settings import Config, RunConfig
from cimfast.engine.data import build_batches, build_dataset, pipeline_candidates
from cimfast.objective.masking import BlockMaskGenerator
from cimfast.pipelines.datasets import FileListDataset, decode_bytes, decode_pil, list_images, read_file_list
from cimfast.pipelines.sampler import EpochSampler, build_loader
from cimfast.pipelines.synthetic import SyntheticBatches
from cimfast.pipelines.validate import validate
from cimfast.pipelines.views import as_unit

try:
    from cimfast.pipelines.dali import DaliBatches, dali_import_error
    HAVE_DALI = dali_import_error() is None
except Exception:  # pragma: no cover
    HAVE_DALI = False
# torchvision 0.29 deprecates its decoders (the torch path falls back to PIL when they are gone)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not importable")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, TOK = 32, 16
MASKS = BlockMaskGenerator(2, 2, 1)  # a 2x2 grid: 32 px / patch 16


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIMFAST_CACHE", str(tmp_path / "cache"))


def _save(a: np.ndarray, path: str, fmt="JPEG", **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, fmt, **kw)


def _photo(h, w, seed):
    """A smooth, asymmetric picture (so a wrong crop or flip shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    f = [np.sin((x * rng.uniform(2, 6) + y * rng.uniform(1, 4)) * np.pi + rng.uniform(0, 6)) for _ in range(3)]
    a = np.stack([(0.5 + 0.4 * c) * 255 for c in f], -1)
    a[: h // 5, : w // 3] = rng.uniform(0, 255, 3)  # a corner patch: not mirror-symmetric
    return a.clip(0, 255).astype(np.uint8)


PALETTE = [(r, g, b) for r in (30, 130, 230) for g in (30, 130, 230) for b in (30, 230)][:12]


@pytest.fixture
def colors(tmp_path):
    """12 flat-colored JPEGs in a 2-class tree: any crop of file i has color PALETTE[i]."""
    files = []
    for i, c in enumerate(PALETTE):
        p = str(tmp_path / "colors" / f"class{i % 2}" / f"{i:02d}.jpg")
        _save(np.full((40 + 4 * i, 50, 3), c, np.uint8), p, quality=95)
        files.append(p)
    return str(tmp_path / "colors")


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    for i in range(8):
        _save(_photo(48 + 8 * (i % 3), 64 - 6 * (i % 4), i), str(d / f"{i}.jpg"), quality=95)
    return str(d)


@pytest.fixture
def messy(tmp_path):
    """Good files, files that decode although odd (PNG named .jpg, grayscale,
    CMYK), and bad ones (truncated, empty, text named .jpg)."""
    d = tmp_path / "messy"
    for i in range(4):
        _save(_photo(40, 48, i), str(d / "a" / f"good{i}.jpg"))
    _save(_photo(40, 40, 10), str(d / "a" / "png_named.jpg"), "PNG")
    _save(_photo(40, 40, 11)[..., 0], str(d / "a" / "gray.jpg"))
    Image.fromarray(_photo(40, 40, 12)).convert("CMYK").save(str(d / "a" / "cmyk.jpg"))
    b = io.BytesIO()
    Image.fromarray(_photo(64, 64, 13)).save(b, "JPEG")
    (d / "b").mkdir()
    data = b.getvalue()
    sos = data.index(b"\xff\xda")  # cut 16 bytes into the scan data: the header parses, no pixel row decodes
    (d / "b" / "truncated.jpg").write_bytes(data[: sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big") + 16])
    (d / "b" / "empty.jpg").write_bytes(b"")
    (d / "b" / "text.jpg").write_text("this is not an image\n")
    return str(d)


def _run(data_path, pipeline, **kw):
    run = RunConfig(data_path=data_path, num_workers=0, seed=kw.pop("seed", 0), demo_samples=kw.pop("demo", 64))
    run.pipeline = pipeline
    for k, v in kw.items():
        setattr(run, k, v)
    return run


def _cfg():
    return Config(preset="tiny").resolve()


def _pipe(run, micro, cfg=None):
    """The tiny preset's batches of ``run``'s data, as the training entry point makes them."""
    return build_batches(build_dataset(cfg or _cfg(), run), run, micro, 0, "cpu", 0, 1)


def _ds(root, seed=0):
    return FileListDataset(list_images(root), SIZE, TOK, seed=seed, mask_fn=MASKS)


def _batches(kind, root, micro, rank=0, world=1, start=0, n=4, seed=0):
    """n batches of one pipeline over ``root`` (small views, tiny masks)."""
    ds = _ds(root, seed)
    run = _run(root, kind, seed=seed)
    it = build_batches(ds, run, micro, start, "cpu", rank, world)
    return [next(it) for _ in range(n)]


KINDS = ["torch", pytest.param("dali-cpu", marks=needs_dali)]


def _color_ids(images):
    assert images.dtype == torch.uint8  # views stay uint8 until the device
    means = as_unit(images).mean(dim=(2, 3)) * 255  # [B, 3]
    pal = torch.tensor(PALETTE, dtype=torch.float32)
    d = (means[:, None, :] - pal[None]).abs().amax(-1)
    assert float(d.min(1).values.max()) < 12, "a flat color came out wrong"
    return d.argmin(1).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_see_every_file_once_per_epoch(colors, kind):
    micro, world = 3, 2  # 12 files, global batch 6: 2 steps per epoch
    seen = {r: [_color_ids(b["images"]) for b in _batches(kind, colors, micro, r, world, n=6)] for r in range(world)}
    for epoch in range(3):
        ids = [i for r in range(world) for s in (2 * epoch, 2 * epoch + 1) for i in seen[r][s]]
        assert sorted(ids) == list(range(12)), (epoch, ids)
    # the epochs are shuffled differently
    assert seen[0][0] + seen[0][1] != seen[0][2] + seen[0][3]
    # one rank with the same global batch sees the same samples in the same steps
    one = [_color_ids(b["images"]) for b in _batches(kind, colors, micro * world, n=2)]
    assert one[0] == seen[0][0] + seen[1][0] and one[1] == seen[0][1] + seen[1][1]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_batches_and_exact_resume(photos, kind):
    a = _batches(kind, photos, 2, n=7)  # 8 files, batch 2: 4 steps per epoch, so this crosses an epoch
    b = _batches(kind, photos, 2, n=7)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    resumed = _batches(kind, photos, 2, start=3, n=4)  # resume at global micro-step 3
    for x, y in zip(a[3:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = _batches(kind, photos, 2, n=1, seed=1)[0]
    assert not torch.equal(other["images"], a[0]["images"])


@pytest.mark.parametrize("kind", KINDS)
def test_both_views_are_one_crop_and_one_flip(photos, kind):
    for b in _batches(kind, photos, 4, n=2):
        big, tok = as_unit(b["images"]), as_unit(b["images_tok"])
        small = F.interpolate(big, size=(TOK, TOK), mode="bilinear", antialias=True, align_corners=False)
        same = (small - tok).abs().mean(dim=(1, 2, 3))
        mirrored = (small.flip(-1) - tok).abs().mean(dim=(1, 2, 3))
        assert float(same.max()) < 0.02, same
        assert bool((mirrored > 3 * same).all()), (same, mirrored)


@needs_dali
def test_dali_and_torch_give_the_same_batches(photos):
    t = _batches("torch", photos, 4, n=3)
    d = _batches("dali-cpu", photos, 4, n=3)
    for x, y in zip(t, d):
        assert x.keys() == y.keys() == {"images", "images_tok", "sample_key", "mask"}
        for k in x:
            assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype and x[k].device == y[k].device, k
        assert torch.equal(x["sample_key"], y["sample_key"]) and torch.equal(x["mask"], y["mask"])
        for k in ("images", "images_tok"):
            assert x[k].dtype == torch.uint8
            diff = (as_unit(x[k]) - as_unit(y[k])).abs()
            # same crop and flip; the decoders and resamplers differ by rounding
            assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.2, (k, float(diff.mean()), float(diff.max()))


def test_validation_keeps_odd_but_good_files_and_counts_bad_ones(messy, tmp_path):
    v = validate(messy)
    s = v.summary
    names = sorted(os.path.basename(p) for p in v.files)
    assert names == ["cmyk.jpg", "good0.jpg", "good1.jpg", "good2.jpg", "good3.jpg", "gray.jpg", "png_named.jpg"]
    assert (s["total"], s["ok"], s["bad"]) == (10, 7, 3)
    assert (s["truncated"], s["empty"], s["not_image"], s["too_large"]) == (1, 1, 1, 0)
    assert s["checked"] == 10 and s["formats"] == {"JPEG": 6, "PNG": 1}
    files, info = read_file_list(v.clean_list)
    assert files == v.files and info == v.info and info[names.index("cmyk.jpg")][:2] == (40, 40)
    assert json.load(open(os.path.splitext(v.clean_list)[0] + ".summary.json"))["ok"] == 7
    # the second run only stats the files; a changed file is checked again
    assert validate(messy).summary["checked"] == 0
    p = os.path.join(messy, "a", "good0.jpg")
    with open(p, "ab") as f:
        f.write(b"\0")
    os.utime(p, ns=(1, 1))
    again = validate(messy).summary
    assert again["checked"] == 1 and again["ok"] == 7
    # a pixel limit leaves out the large ones (decoded again when the limit goes up)
    small = validate(messy, max_pixels=1700).summary
    assert small["too_large"] == 4 and small["ok"] == 3
    assert validate(messy).summary["ok"] == 7


def test_validate_command_line(messy, tmp_path):
    out = tmp_path / "clean.txt"
    r = subprocess.run([sys.executable, "-m", "cimfast.pipelines.validate", messy, "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["ok"], s["bad"], s["truncated"], s["empty"], s["not_image"]) == (7, 3, 1, 1, 1)
    assert len(out.read_text().splitlines()) == 7


@pytest.mark.parametrize("kind", KINDS)
def test_a_short_run_on_messy_data(messy, kind):
    run = _run(messy, kind)
    it = _pipe(run, 3)  # validates, then reads the clean list
    for _ in range(6):  # 7 good files, batch 3: crosses epochs
        b = next(it)
        assert b["images"].shape == (3, 3, 112, 112) and b["mask"].shape == (3, 49)
        assert bool(torch.isfinite(b["images"]).all())


def test_torch_path_survives_unvalidated_bad_files(messy):
    ds = FileListDataset(list_images(messy), SIZE, TOK, mask_fn=MASKS)  # no validation: bad files included
    it = iter(build_loader(ds, 5, 0, 1, 0, 0, 0, False))
    for _ in range(4):
        assert next(it)["images"].shape == (5, 3, SIZE, SIZE)


@needs_dali
def test_dali_recovers_from_a_file_it_cannot_decode(messy, caplog):
    """Not validated: the truncated file (its header is intact) breaks the
    DALI pipeline; the run goes on and takes the torch path's replacement."""
    files = list_images(messy)
    ds = FileListDataset(files, SIZE, TOK, mask_fn=MASKS)
    bad = files.index(os.path.join(messy, "b", "truncated.jpg"))
    sampler = EpochSampler(len(files), 2, seed=0)
    steps = [s for s in range(10) if bad in sampler.step_indices(s)[1]]
    assert steps
    with caplog.at_level(logging.WARNING, logger="cimfast"):
        dali = DaliBatches(files, SIZE, TOK, 2, mask_fn=MASKS, threads=1)
        torch_it = iter(build_loader(ds, 2, 0, 1, 0, 0, 0, False))
        for s in range(steps[0] + 2):
            x, y = next(dali), next(torch_it)
            assert torch.equal(x["sample_key"], y["sample_key"])
            assert float((as_unit(x["images"]) - as_unit(y["images"])).abs().mean()) < 0.01, s
    assert bad in dali.bad or bad in dali.recode
    assert "truncated.jpg" in caplog.text


def test_decoding_odd_files_matches_pil(messy):
    for name in ("good0.jpg", "png_named.jpg", "gray.jpg", "cmyk.jpg"):
        data = open(os.path.join(messy, "a", name), "rb").read()
        a, b = decode_bytes(data), decode_pil(data)
        assert a.shape == b.shape == (3, 40, 48 if name == "good0.jpg" else 40) and a.dtype == torch.uint8
        assert int((a.int() - b.int()).abs().max()) <= 1, name


def test_synthetic_batches():
    it = SyntheticBatches(4, SIZE, TOK, "cpu", mask_fn=BlockMaskGenerator(4, 5, 2), bank=16)
    a, b = next(it), next(it)
    assert a["images"].shape == (4, 3, SIZE, SIZE) and a["images_tok"].shape == (4, 3, TOK, TOK)
    assert a["mask"].shape == (4, 16) and a["mask"].dtype == torch.bool and bool((a["mask"].sum(1) == 5).all())
    assert a["sample_key"].dtype == torch.int64 and not torch.equal(a["sample_key"], b["sample_key"])
    assert not torch.equal(a["mask"], b["mask"])
    assert 0 <= float(a["images"].min()) and float(a["images"].max()) <= 1
    run = _run(None, "synthetic")
    s = next(_pipe(run, 2))
    assert s["images"].shape == (2, 3, 112, 112) and s["mask"].shape == (2, 49)


def test_pipeline_choice(caplog, monkeypatch):
    import cimfast.engine.data

    monkeypatch.setattr(cimfast.engine.data, "_LOGGED", set())
    assert pipeline_candidates("auto", torch.device("cuda", 0)) == ["dali-gpu", "torch"]
    assert pipeline_candidates("auto", torch.device("cpu")) == ["torch"]
    assert pipeline_candidates("torch", torch.device("cpu")) == ["torch"]
    with pytest.raises(ValueError, match="pipeline"):
        pipeline_candidates("fast", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="dali-gpu"):
        _pipe(_run(None, "dali-gpu"), 2)
    with caplog.at_level(logging.INFO, logger="cimfast"):
        b = next(_pipe(_run(None, "auto", demo=8), 2))
    assert b["images"].shape == (2, 3, 112, 112)
    assert "data pipeline: torch" in caplog.text


@needs_dali
def test_demo_data_through_dali_matches_torch():
    """The demo photographs are written once as JPEG files for DALI."""
    cfg = _cfg()
    d = next(_pipe(_run(None, "dali-cpu", demo=16), 4, cfg))
    t = next(_pipe(_run(None, "torch", demo=16), 4, cfg))
    assert torch.equal(d["sample_key"], t["sample_key"]) and torch.equal(d["mask"], t["mask"])
    assert float((as_unit(d["images"]) - as_unit(t["images"])).abs().mean()) < 0.02
    assert len(os.listdir(os.path.join(os.environ["CIMFAST_CACHE"], "demo-jpeg-q95", "train"))) >= 10


def _tiny_tokenizer_missing():
    from cimfast.objective.cim import TINY_TOKENIZER

    return not os.path.isfile(TINY_TOKENIZER)


@pytest.mark.skipif(_tiny_tokenizer_missing(), reason="the tiny preset's tokenizer asset is not built")
def test_training_runs_two_steps_on_messy_data(messy, tmp_path):
    """The tiny preset for 2 steps on a folder with bad files: validated at the
    start (the bad files are left out and reported), then trained."""
    for i in range(12):  # the default micro-batch is 16: enough good files for one
        _save(_photo(48, 56, 100 + i), os.path.join(messy, "c", f"{i}.jpg"))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "train.py"), "--data_path", messy,
                        "--max_steps", "2", "--num_workers", "0", "--no-progress", "--output_dir", str(out)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "3 of 22 files left out" in r.stderr
    assert (out / "metrics.jsonl").is_file()
