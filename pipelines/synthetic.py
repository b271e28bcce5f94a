"""Synthetic batches made on the device, for compute-only benchmarks.

The images (smooth random fields, so the tokenizer sees image-like input) and
their tokenizer views are made once; every step only picks masks from a bank
made at the start and computes sampling keys, both with device arithmetic
(no per-step Python mask generation, no host-to-device copy, no sync).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from cimfast.pipelines.views import sample_mask


class SyntheticBatches:
    """Endless iterator of dict batches on ``device``, shaped like the real pipelines':
    images [B,3,S,S] and images_tok [B,3,T,T] float in [0,1], sample_key [B] int64,
    mask [B,N] bool (when ``mask_fn`` is given)."""

    def __init__(self, batch: int, size: int, tok_size: Optional[int], device="cpu",
                 mask_fn: Optional[Callable] = None, seed: int = 0, rank: int = 0, world: int = 1,
                 start_step: int = 0, bank: int = 1024):
        device = torch.device(device)
        self.batch, self.rank, self.world, self.step = batch, rank, world, start_step
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + rank)
        low = torch.rand(batch, 3, max(2, size // 16), max(2, size // 16), generator=g)
        images = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
        self.images = images.to(device)
        self.images_tok = None
        if tok_size:
            tok = F.interpolate(images, size=(tok_size, tok_size), mode="bilinear", antialias=True, align_corners=False)
            self.images_tok = tok.clamp_(0, 1).to(device)
        self.masks = None
        if mask_fn is not None:
            k = max(bank, batch)
            bank_np = np.stack([sample_mask(seed, 0, i, mask_fn) for i in range(k)])
            self.masks = torch.from_numpy(bank_np).to(device)
        self._arange = torch.arange(batch, device=device, dtype=torch.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        base = (self.step * self.world + self.rank) * self.batch
        pos = self._arange + base  # global sample positions of this micro-batch
        out = {"images": self.images, "sample_key": pos & 0xFFFFFFFF}
        if self.images_tok is not None:
            out["images_tok"] = self.images_tok
        if self.masks is not None:
            out["mask"] = self.masks.index_select(0, pos % self.masks.shape[0])
        self.step += 1
        return out
