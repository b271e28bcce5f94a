"""ResPix loss: MSE against the original image normalized by a sliding window.

Reference semantics: for each channel and pixel, mean and variance are taken
over the ``window x window`` neighbourhood centred on the pixel (for an even
window the extra row/column lies above/left), clipped at the image border
(only real pixels count). The target is ``(x - mean) / sqrt(var + eps)``; the
loss is the mean over all elements of ``(pred - target) ** 2``. The gradient
flows to ``pred`` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    lo = window // 2
    hi = window - 1 - lo
    ones = torch.ones_like(x[:1, :1])
    pad = (lo, hi, lo, hi)
    s = F.avg_pool2d(F.pad(x, pad), window, stride=1, divisor_override=1)
    n = F.avg_pool2d(F.pad(ones, pad), window, stride=1, divisor_override=1)
    return s / n


def window_normalize(x: torch.Tensor, window: int, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, mean, std) of an image batch [B, C, H, W], in fp32 (fp64 stays fp64)."""
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = _box_mean(x, window)
    var = (_box_mean(x * x, window) - mean * mean).clamp_min(0)
    std = torch.sqrt(var + eps)
    return (x - mean) / std, mean, std


def window_norm_loss_reference(pred: torch.Tensor, image: torch.Tensor, window: int,
                               eps: float = EPS) -> torch.Tensor:
    """pred, image: [B, C, H, W]. Returns the scalar loss (fp32; fp64 for fp64 inputs)."""
    if pred.shape != image.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and image {tuple(image.shape)} differ in shape")
    with torch.no_grad():
        target, _, _ = window_normalize(image, window, eps)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return ((pred.to(dtype) - target.to(dtype)) ** 2).mean()


def window_norm_loss(pred, image, window: int, eps: float = EPS):
    """Dispatch point for the ResPix loss (see ``cimfast.kernels.dispatch``)."""
    return window_norm_loss_reference(pred, image, window, eps)
