"""Built-in demo data: real photographs that scikit-image ships in its wheel
(and scikit-learn's two sample photos), no download. Each training sample is
a random resized crop of one of them, so a few photos give many distinct
samples.
"""
from __future__ import annotations

import functools

import numpy as np

# RGB photographs that load offline from skimage.data (verified 2026-11).
SKIMAGE_RGB = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
SKIMAGE_GRAY = ("camera", "brick", "grass", "gravel", "moon", "coins", "cell")
# Held out from training: the tokenizer's and the picture's validation photos.
HELD_OUT = ("cat", "coffee", "rocket")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


@functools.lru_cache(maxsize=2)
def demo_images(split: str = "train") -> tuple[np.ndarray, ...]:
    """The demo photographs as HxWx3 uint8 arrays (``split``: train or heldout)."""
    try:
        import skimage.data as data
    except ImportError as e:
        raise ImportError("the demo data comes from scikit-image's sample photos: pip install scikit-image") from e
    if split == "heldout":
        return tuple(_rgb(getattr(data, n)()) for n in HELD_OUT)
    if split != "train":
        raise ValueError(f"split must be train or heldout, got {split!r}")
    imgs = [_rgb(getattr(data, n)()) for n in SKIMAGE_RGB + SKIMAGE_GRAY]
    imgs += [_rgb(a) for a in data.stereo_motorcycle()[:2]]
    try:
        from sklearn.datasets import load_sample_images
        imgs += [_rgb(a) for a in load_sample_images().images]
    except ImportError:
        pass
    return tuple(imgs)
