"""Two views of one crop: the enhancer view and the tokenizer view.

Every random decision is a pure function of (seed, epoch, sample index)
(counter-based), so any worker, rank or resumed run recomputes the same crop
and flip for the same sample.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one sample's random decisions (stream 0: crop, 1: mask)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(stream)])


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


def two_views(img: torch.Tensor, params, size: int, tok_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W] -> (enhancer view [3, size, size], tokenizer view
    [3, tok_size, tok_size] or None), both float in [0, 1], from one crop and one flip.

    Bilinear resizing with antialiasing (as PIL and DALI do). A uint8 image is
    resized in uint8 by torch's vectorized channels-last kernel (several times
    faster than in float on the CPU; at most 1/255 apart), a float one
    (values in [0, 255]) in float."""
    top, left, h, w, flip = params
    crop = img[:, top:top + h, left:left + w].unsqueeze(0)
    if flip:
        crop = crop.flip(-1)
    if crop.dtype == torch.uint8:
        crop = crop.contiguous(memory_format=torch.channels_last)

        def resize(s):
            out = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            return out[0].float().div_(255).contiguous()
    else:  # float in [0, 255]
        crop = crop.float().div(255)

        def resize(s):
            out = F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            return out[0].clamp_(0, 1)
    return resize(size), (resize(tok_size) if tok_size is not None else None)
