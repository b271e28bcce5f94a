"""Input pipeline throughput: DALI on the CPU against the torch DataLoader path
(PIL decoding, and torchvision.io decoding), on the same generated JPEG files,
with the same batch, output sizes, masks and thread count, in one run.

    python benchmarks/bench_pipelines.py [--files 500] [--batch 64] [--threads 2] [--batches 20]
    pytest benchmarks/bench_pipelines.py -s        # a shorter run of the same

Each pipeline makes exactly what training consumes: the enhancer view and the
tokenizer view of one crop (float CHW in [0, 1]), the sampling key and the
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

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_jpegs(folder: str, n: int = 500, seed: int = 0, lo: int = 300, hi: int = 500) -> list[str]:
    """``n`` JPEG files of real photographs (random crops of the demo photos,
    resized so each side is in [lo, hi] pixels), written once."""
    from PIL import Image

    from cimfast.pipelines.demo import demo_images

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
        im = Image.fromarray(np.ascontiguousarray(a[top:top + ch, left:left + cw])).resize((out_w, out_h), Image.BICUBIC)
        im.save(p, "JPEG", quality=90)
    return paths


def _rate(it, batch: int, batches: int, warmup: int) -> tuple[float, dict]:
    for _ in range(warmup):
        b = next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t0
    return batches * batch / dt, {k: (tuple(v.shape), str(v.dtype)) for k, v in b.items()}


def bench(files: list[str], batch: int = 64, threads: int = 2, batches: int = 20, warmup: int = 3,
          size: int = 224, tok_size: int = 112, masks: bool = True, which=("torch-pil", "torch-tv", "dali-cpu")):
    import torch
    from torch.utils.data import DataLoader

    from cimfast.masking import BlockMaskGenerator
    from cimfast.pipelines.datasets import FileListDataset
    from cimfast.pipelines.sampler import EpochSampler

    torch.set_num_threads(1)  # the main process only collects batches
    mask_fn = BlockMaskGenerator(size // 16, 75 if size >= 224 else 20, 16 if size >= 224 else 4) if masks else None
    results = {}
    for name in which:
        if name.startswith("torch"):
            ds = FileListDataset(files, size, tok_size, seed=0, mask_fn=mask_fn,
                                 decoder="pil" if name == "torch-pil" else "auto")
            sampler = EpochSampler(len(ds), batch, seed=0)
            loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=threads, drop_last=True,
                                prefetch_factor=4, persistent_workers=True,
                                worker_init_fn=lambda _: torch.set_num_threads(1))
            it = iter(loader)
        elif name == "dali-cpu":
            from cimfast.pipelines.dali import DaliBatches

            it = DaliBatches(files, size, tok_size, batch, seed=0, mask_fn=mask_fn, threads=threads, py_workers=0)
        else:
            raise ValueError(name)
        rate, shapes = _rate(it, batch, batches, warmup)
        results[name] = {"img_per_s": round(rate, 1), "shapes": shapes}
        del it
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
    ap.add_argument("--only", nargs="*", default=["torch-pil", "torch-tv", "dali-cpu"])
    a = ap.parse_args(argv)
    files = make_jpegs(os.path.join(a.folder, str(a.files)), a.files)
    res = bench(files, a.batch, a.threads, a.batches, a.warmup, a.size, a.size // 2, not a.no_masks, a.only)
    print(json.dumps({"files": len(files), "batch": a.batch, "threads": a.threads, "masks": not a.no_masks,
                      "cpus": os.cpu_count(), **{k: {kk: vv for kk, vv in v.items() if kk != "shapes"}
                                                 for k, v in res.items()}}, indent=1))
    if "dali-cpu" in res and "torch-pil" in res:
        print(f"DALI CPU / torchvision+PIL = {res['dali-cpu']['x_torch_pil']:.2f}x")
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
    res = bench(files, batch=16, threads=2, batches=4, warmup=1, size=112, tok_size=56, which=which)
    print(json.dumps(res, indent=1))
    shapes = {k: v["shapes"] for k, v in res.items()}
    first = next(iter(shapes.values()))
    for k, s in shapes.items():
        assert s == first, (k, s, first)
    if "dali-cpu" not in res:
        pytest.skip("nvidia-dali is not installed: only the torch paths were measured")


if __name__ == "__main__":
    sys.exit(main())
