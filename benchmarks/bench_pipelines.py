"""Input pipeline throughput: DALI on the CPU against the torch DataLoader path
(PIL decoding, and torchvision.io decoding), on the same generated JPEG files,
with the same batch, output sizes, masks and thread count, in one run.

    python benchmarks/bench_pipelines.py [--files 500] [--batch 64] [--threads 2] [--batches 20]
    pytest benchmarks/bench_pipelines.py -s        # a shorter run of the same

Each pipeline makes exactly what training consumes: the enhancer view and the
tokenizer view of one crop (uint8 CHW; the old PIL path's baseline: float), the sampling key and the
blockwise mask (``--no-masks``: without masks). Images per second are
measured after a warm-up; the ratios to torch+PIL are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cimfast.objective.masking import BlockMaskGenerator  # noqa: E402
from cimfast.pipelines.dali import DaliBatches  # noqa: E402
from cimfast.pipelines.datasets import FileListDataset  # noqa: E402
from cimfast.pipelines.demo import demo_images  # noqa: E402
from cimfast.pipelines.sampler import EpochSampler  # noqa: E402
from cimfast.pipelines.views import sample_crop, sample_key, sample_mask  # noqa: E402


def make_jpegs(folder: str, n: int = 500, seed: int = 0, lo: int = 300, hi: int = 500) -> list[str]:
    """``n`` JPEG files of real photographs (random crops of the demo photos,
    resized so each side is in [lo, hi] pixels), written once."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{i:05d}.jpg") for i in range(n)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    photos = demo_images("train")
    rng = np.random.default_rng(seed)
    for i, p in enumerate(paths):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out_w, out_h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        im = Image.fromarray(np.ascontiguousarray(a[top:top + ch, left:left + cw]))
        im = im.resize((out_w, out_h), Image.BICUBIC)
        im.save(p, "JPEG", quality=90)
    return paths


class LegacyPILDataset:
    """The torch path as it was before this benchmark's pipelines (the
    baseline "torchvision + PIL"): PIL decoding and float resizing."""

    def __init__(self, files, size, tok_size, seed=0, mask_fn=None):
        self.files, self.size, self.tok_size, self.seed, self.mask_fn = files, size, tok_size, seed, mask_fn

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        epoch, index = item
        with Image.open(self.files[index]) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
        top, left, h, w, flip = sample_crop(self.seed, epoch, index, img.shape[1], img.shape[2])
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float().div_(255)
        if flip:
            crop = crop.flip(-1)
        views = [F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)
                 for s in (self.size, self.tok_size)]
        out = {"images": views[0], "images_tok": views[1],
               "sample_key": torch.tensor(sample_key(self.seed, epoch, index))}
        if self.mask_fn is not None:
            out["mask"] = torch.from_numpy(sample_mask(self.seed, epoch, index, self.mask_fn))
        return out


PIPELINES = {
    "torch-pil": "torch DataLoader, PIL decoding + float resizing (the old path: the baseline)",
    "torch-tv": "torch DataLoader, torchvision.io decoding + uint8 resizing (the torch path now)",
    "dali-cpu": "DALI on the CPU (ROI decoding, uint8 resizing)",
    "dali-gpu": "DALI on the GPU (nvJPEG decoding, outputs on cuda:0; where CUDA is)",
}


def _iterator(name, files, batch, threads, size, tok_size, mask_fn):
    if name.startswith("torch"):
        if name == "torch-pil":
            ds = LegacyPILDataset(files, size, tok_size, seed=0, mask_fn=mask_fn)
        else:
            ds = FileListDataset(files, size, tok_size, seed=0, mask_fn=mask_fn)
        sampler = EpochSampler(len(ds), batch, seed=0)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=threads, drop_last=True,
                            prefetch_factor=4, persistent_workers=True, worker_init_fn=_one_thread)
        return iter(loader)
    if name == "dali-cpu":
        return DaliBatches(files, size, tok_size, batch, seed=0, mask_fn=mask_fn, threads=threads, py_workers=0)
    if name == "dali-gpu":
        return DaliBatches(files, size, tok_size, batch, seed=0, mask_fn=mask_fn, threads=threads, py_workers=0,
                           device="gpu", device_id=0)
    raise ValueError(f"unknown pipeline {name}; known: {', '.join(PIPELINES)}")


def _wait(batch) -> None:
    if any(v.is_cuda for v in batch.values()):
        torch.cuda.synchronize()


def _one_thread(_):
    torch.set_num_threads(1)


def bench(files: list[str], batch: int = 64, threads: int = 2, batches: int = 20, warmup: int = 3,
          size: int = 224, tok_size: int = 112, masks: bool = True, which=tuple(PIPELINES), rounds: int = 3):
    """Images per second of each pipeline: the median of ``rounds`` rounds,
    the pipelines taking turns (a fresh iterator per round, timed after
    ``warmup`` batches), so that a change of the machine's load hits all alike."""
    torch.set_num_threads(1)  # the main process only collects batches
    mask_fn = BlockMaskGenerator(size // 16, 75 if size >= 224 else 20, 16 if size >= 224 else 4) if masks else None
    rates = {n: [] for n in which}
    shapes, ranges = {}, {}
    for _ in range(rounds):
        for name in which:
            it = _iterator(name, files, batch, threads, size, tok_size, mask_fn)
            for _ in range(warmup):
                b = next(it)
                _wait(b)
            t0 = time.perf_counter()
            for _ in range(batches):
                b = next(it)
            _wait(b)  # a batch on the GPU is done when its stream is
            rates[name].append(batches * batch / (time.perf_counter() - t0))
            shapes[name] = {k: (tuple(v.shape), str(v.dtype)) for k, v in b.items()}
            ranges[name] = {k: (round(float(v.min()), 3), round(float(v.max()), 3)) for k, v in b.items()
                            if v.is_floating_point()}
            del it, b
    results = {}
    for name in which:
        r = sorted(rates[name])
        results[name] = {"img_per_s": round(r[len(r) // 2], 1), "rounds": [round(x, 1) for x in rates[name]],
                         "shapes": shapes[name], "ranges": ranges[name], "what": PIPELINES[name]}
    base = results.get("torch-pil", {}).get("img_per_s")
    if base:
        for r in results.values():
            r["x_torch_pil"] = round(r["img_per_s"] / base, 2)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "cimfast-bench-jpegs"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per pipeline")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=224, help="enhancer view (tokenizer view: half)")
    ap.add_argument("--no-masks", action="store_true")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")
    ap.add_argument("--only", nargs="*", default=[n for n in PIPELINES if n != "dali-gpu" or torch.cuda.is_available()])
    a = ap.parse_args(argv)
    files = make_jpegs(os.path.join(a.folder, str(a.files)), a.files)
    res = bench(files, a.batch, a.threads, a.batches, a.warmup, a.size, a.size // 2, not a.no_masks, a.only,
                a.rounds)
    head = {"files": len(files), "batch": a.batch, "threads": a.threads, "masks": not a.no_masks,
            "size": [a.size, a.size // 2], "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(head))
    for k, v in res.items():
        print(f"{k:10s} {v['img_per_s']:8.1f} img/s  x{v.get('x_torch_pil', float('nan')):.2f}  rounds {v['rounds']}  "
              f"ranges {v['ranges']}  ({v['what']})")
    if "dali-cpu" in res and "torch-pil" in res:
        print(f"DALI CPU / torchvision+PIL = {res['dali-cpu']['x_torch_pil']:.2f}x"
              + (f"; DALI CPU / torch path now = {res['dali-cpu']['img_per_s'] / res['torch-tv']['img_per_s']:.2f}x"
                 if "torch-tv" in res else ""))
    if "dali-gpu" in res and "torch-tv" in res:
        print(f"DALI GPU / torch path now = {res['dali-gpu']['img_per_s'] / res['torch-tv']['img_per_s']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**head, "results": res}, f, indent=1)
    return 0


def test_bench_pipelines_short(tmp_path):
    """A short run: every pipeline makes batches of the same shapes; prints the rates."""
    import pytest

    which = ["torch-pil", "torch-tv"]
    try:
        import nvidia.dali  # noqa: F401
        which.append("dali-cpu")
    except ImportError:
        pass
    files = make_jpegs(str(tmp_path / "jpegs"), 96, lo=300, hi=400)
    res = bench(files, batch=16, threads=2, batches=4, warmup=1, size=112, tok_size=56, which=which, rounds=1)
    print(json.dumps(res, indent=1))
    shapes = {k: v["shapes"] for k, v in res.items()}
    first = next(iter(shapes.values()))
    for k, s in shapes.items():
        assert s == first, (k, s, first)
    if "dali-cpu" not in res:
        pytest.skip("nvidia-dali is not installed: only the torch paths were measured")


if __name__ == "__main__":
    sys.exit(main())
