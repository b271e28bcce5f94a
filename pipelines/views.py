"""Two views of one crop: the enhancer view and the tokenizer view.

Every random decision is a pure function of (seed, epoch, sample index)
(counter-based), so any worker, rank or resumed run recomputes the same crop
and flip for the same sample.
"""
from __future__ import annotations

import math
from enum import IntEnum
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


class Stream(IntEnum):
    """The independent random streams of one sample. Every pipeline draws each
    decision from its own stream, so adding a draw to one never shifts another."""

    CROP = 0          # random resized crop and horizontal flip
    MASK = 1          # the blockwise mask
    SAMPLING_KEY = 2  # the key of the generator's token draws (see cimfast.kernels.sampling)


def sample_rng(seed: int, epoch: int, index: int, stream: Stream) -> np.random.Generator:
    """The generator for one of a sample's random decisions."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(Stream(stream))])


def sample_crop(seed: int, epoch: int, index: int, height: int, width: int, scale=SCALE):
    """(top, left, h, w, flip) of sample ``index`` in ``epoch`` for an image of height x width;
    ``scale``: the range of the crop's share of the image's area."""
    return crop_params(sample_rng(seed, epoch, index, Stream.CROP), height, width, scale)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The sample's token-draw key (a uint32 value)."""
    return int(sample_rng(seed, epoch, index, Stream.SAMPLING_KEY).integers(1 << 32))


def sample_mask(seed: int, epoch: int, index: int, mask_fn: Optional[Callable]) -> Optional[np.ndarray]:
    """The sample's mask, flattened (None without a mask function)."""
    if mask_fn is None:
        return None
    return np.ascontiguousarray(np.asarray(mask_fn(sample_rng(seed, epoch, index, Stream.MASK))).reshape(-1))


def crop_params(rng: np.random.Generator, height: int, width: int, scale=SCALE, ratio=RATIO):
    """(top, left, h, w, flip) as torchvision's RandomResizedCrop + horizontal flip."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    flip = bool(rng.random() < 0.5)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w, flip
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def as_unit(x: torch.Tensor) -> torch.Tensor:
    """Views as floats in [0, 1]. The pipelines hand over uint8 views (a
    quarter of the bytes of float32); the model calls this on the training
    device, where it fuses into the first normalization."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


def two_views(img: torch.Tensor, params, size: int, tok_size: Optional[int]
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """uint8 [3, H, W] -> (enhancer view [3, size, size], tokenizer view
    [3, tok_size, tok_size] or None), both uint8, from one crop and one flip.

    Views stay uint8 until they reach the training device (a quarter of the
    bytes of float32 through the loader and the host-to-device copy); the
    model turns them into [0, 1] floats there (``as_unit``).
    Bilinear resizing with antialiasing (as PIL and DALI do), in uint8 by
    torch's vectorized channels-last kernel (several times faster than in
    float on the CPU; at most 1/255 apart)."""
    if img.dtype != torch.uint8:
        raise TypeError(f"two_views takes uint8 images, got {img.dtype}")
    top, left, h, w, flip = params
    crop = img[:, top:top + h, left:left + w].unsqueeze(0)
    if flip:
        crop = crop.flip(-1)
    crop = crop.contiguous(memory_format=torch.channels_last)

    def resize(s):
        out = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return out[0].contiguous()
    return resize(size), (resize(tok_size) if tok_size is not None else None)
