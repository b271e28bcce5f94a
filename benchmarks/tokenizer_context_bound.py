"""Is the decoder what keeps the tiny tokenizer's held-out PSNR under 22 dB?

    python benchmarks/tokenizer_context_bound.py [--steps 2000]   # ~12 minutes on 2 cores

Two measurements on the tokenizer report's 64 held-out crops (56 px):

1. ``hard_finetune``: the shipped tokenizer's decoder fine-tuned on the hard
   codes its frozen encoder gives (training decodes soft Gumbel-softmax
   mixtures; the report and pre-training decode hard ids), with MSE, the loss
   PSNR measures.
2. ``kmeans_context``: a fresh tiny-architecture decoder trained (MSE) on the
   codes of the nearest of 512 k-means centroids of 8 x 8 cells: k-means alone
   is a quantizer that sees one cell; the decoder adds what the neighbouring
   codes tell. Its held-out PSNR bounds what 512 codes of this kind carry
   through this decoder; its PSNR on training batches is printed beside it.

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenizer_bounds import cells, crops  # noqa: E402

from cimfast.objective.cim import TINY_TOKENIZER  # noqa: E402
from cimfast.tokenizer.files import load_tokenizer  # noqa: E402
from cimfast.tokenizer.model import Decoder, map_pixels, unmap_pixels  # noqa: E402


def db(mse: float) -> float:
    return 10 * math.log10(1 / mse)


def fit_decoder(dec: Decoder, train_ids, train, held_ids, held, steps: int, lr: float) -> dict:
    """MSE training of ``dec`` on one-hot codes; PSNR on held-out crops and on the last training batch."""
    for p in dec.parameters():
        p.requires_grad_(True)
    dec.train()
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    vocab = dec.blocks.input.n_in

    def run(ids):
        return unmap_pixels(torch.sigmoid(dec.forward_soft(F.one_hot(ids, vocab).float())[:, :3]))

    with torch.no_grad():
        before = db(F.mse_loss(run(held_ids), held).item())
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (32,), generator=g)
        loss = F.mse_loss(run(train_ids[idx]), train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = db(F.mse_loss(run(held_ids), held).item())
    return {"heldout_psnr_before": before, "heldout_psnr_after": after, "last_train_batch_psnr": db(loss.item())}


def main(argv=None) -> int:
    from sklearn.cluster import MiniBatchKMeans

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=TINY_TOKENIZER)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--train_crops", type=int, default=6000)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    train, held = crops("train", a.train_crops, 0), crops("heldout", 64, 1)  # held: the report's crops
    out = {"steps": a.steps, "train_crops": a.train_crops}

    tok = load_tokenizer(a.tokenizer)
    with torch.no_grad():
        tr_ids = torch.cat([tok.encoder(map_pixels(train[i:i + 256])).argmax(1) for i in range(0, len(train), 256)])
        h_ids = tok.encoder(map_pixels(held)).argmax(1)
    out["hard_finetune"] = fit_decoder(tok.decoder, tr_ids, train, h_ids, held, a.steps // 2, 1e-3)

    km = MiniBatchKMeans(tok.vocab_size, batch_size=4096, n_init=1, max_iter=50, random_state=0)
    km.fit(cells(train[:3000]))
    grid = train.shape[-1] // 8

    def codes(x):
        return torch.from_numpy(km.predict(cells(x)).astype(np.int64)).view(len(x), grid, grid)

    k_train, k_held = codes(train), codes(held)
    kmeans_only = db(float(np.mean((cells(held) - km.cluster_centers_[k_held.view(-1).numpy()]) ** 2)))
    torch.manual_seed(0)
    out["kmeans_context"] = {"kmeans_alone_heldout_psnr": kmeans_only,
                             **fit_decoder(Decoder(tok.spec), k_train, train, k_held, held, a.steps, 2e-3)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
