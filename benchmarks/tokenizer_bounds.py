"""What the tiny tokenizer can and cannot carry, on the demo photographs.

    python benchmarks/tokenizer_bounds.py [--tokenizer PATH]

1. Reconstruction bounds for 8 x 8 cells with a 512-entry codebook on the
   held-out crops (the tokenizer report's 64 crops of cat, coffee, rocket at
   56 px): each cell replaced by its own mean colour, and by the nearest of
   512 k-means centroids of training cells (a quantizer that sees one cell at
   a time; a convolutional decoder also sees the neighbours).
2. How much of the ResPix target survives the tokenizer: for the demo's
   112 px views and several windows, the loss of the best scaled copy of the
   window-normalized tokenize -> decode reconstruction (a * normalized(recon))
   divided by the trivial loss (predicting zero). 1.0: nothing of the target
   survives; a perfect tokenizer (the 56 px view upsampled) is given beside it.

Prints one JSON object (the numbers in benchmarks/RESULTS.md come from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cimfast.kernels.pixel_loss import window_normalize  # noqa: E402
from cimfast.objective.cim import TINY_TOKENIZER  # noqa: E402
from cimfast.pipelines.datasets import DemoDataset  # noqa: E402
from cimfast.pipelines.views import as_unit  # noqa: E402
from cimfast.tokenizer.files import load_tokenizer  # noqa: E402


def cells(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] -> [B * H/8 * W/8, 192] (8 x 8 x 3 cells)."""
    return x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(-1, 192).numpy()


def crops(split: str, n: int, seed: int, size: int = 56) -> torch.Tensor:
    """``n`` random crops of the demo photos of ``split``, [n, 3, size, size] in [0, 1]."""
    ds = DemoDataset(size, None, samples=n, split=split, seed=seed)
    return as_unit(torch.stack([ds[(0, i)]["images"] for i in range(n)]))


def psnr(a, b) -> float:
    return float(10 * np.log10(1 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def quantizer_bounds(train: torch.Tensor, held: torch.Tensor, vocabs=(512,)) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    q = cells(held)
    mean_only = np.repeat(q.reshape(-1, 3, 64).mean(2, keepdims=True), 64, 2).reshape(-1, 192)
    out = {"cell_mean_colour_psnr": psnr(q, mean_only)}
    for vocab in vocabs:
        km = MiniBatchKMeans(vocab, batch_size=4096, n_init=1, max_iter=50, random_state=0).fit(cells(train))
        ids = km.predict(q)
        p = np.bincount(ids, minlength=vocab) / len(ids)
        out.update({f"kmeans{vocab}_psnr": psnr(q, km.cluster_centers_[ids]),
                    f"kmeans{vocab}_codes_used": int((p > 0).sum()),
                    f"kmeans{vocab}_perplexity": float(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))})
    return out


def surviving_target(big: torch.Tensor, recon: torch.Tensor, window: int) -> float:
    """Best scaled copy's loss / trivial loss (1: nothing of the target survives)."""
    t, _, _ = window_normalize(big, window)
    p, _, _ = window_normalize(recon.clamp(0, 1), window)
    a = (t * p).mean() / (p * p).mean()
    return float(((t - a * p) ** 2).mean() / (t ** 2).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=TINY_TOKENIZER, help="tokenizer file (default: the shipped tiny one)")
    ap.add_argument("--windows", type=int, nargs="+", default=[9, 17, 33, 49])
    ap.add_argument("--kmeans", type=int, nargs="+", default=[512, 2048], help="k-means codebook sizes")
    a = ap.parse_args(argv)
    train, held = crops("train", 3000, 0), crops("heldout", 64, 1)  # held: the tokenizer report's crops
    out = {"bounds_heldout_56px": quantizer_bounds(train, held, a.kmeans)}
    tok = load_tokenizer(a.tokenizer)
    views = DemoDataset(112, 56, samples=64, seed=0)
    items = [views[(0, i)] for i in range(64)]
    big = as_unit(torch.stack([x["images"] for x in items]))
    small = as_unit(torch.stack([x["images_tok"] for x in items]))
    with torch.no_grad():
        recon = F.interpolate(tok.decode(tok.tokenize(small)), size=112, mode="bilinear", align_corners=False)
    perfect = F.interpolate(small, size=112, mode="bilinear", align_corners=False)
    out["respix_surviving_112px"] = {
        f"window_{w}": {"tokenizer": surviving_target(big, recon, w), "perfect_56px_view": surviving_target(big, perfect, w)}
        for w in a.windows}
    out["tokenizer"] = a.tokenizer
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
