"""Built-in demo data: real photographs that scikit-image ships in its wheel
(and scikit-learn's two sample photos), no download. Each training sample is
a random resized crop of one of them, so a few photos give many distinct
samples.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from cimfast.pipelines.atomic import write_atomically

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


def default_cache_dir() -> str:
    """``$CIMFAST_CACHE``, else ``$XDG_CACHE_HOME/cimfast``, else ``~/.cache/cimfast``."""
    if os.environ.get("CIMFAST_CACHE"):
        return os.environ["CIMFAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cimfast")


def demo_jpeg_files(split: str = "train", cache_dir: Optional[str] = None, quality: int = 95) -> tuple[list, list]:
    """The demo photographs written once as JPEG files (for readers that need
    files): (paths, (height, width, "JPEG") per path)."""
    from PIL import Image

    folder = os.path.join(cache_dir or default_cache_dir(), f"demo-jpeg-q{quality}", split)
    os.makedirs(folder, exist_ok=True)
    paths, info = [], []
    for i, a in enumerate(demo_images(split)):
        path = os.path.join(folder, f"{i:03d}_{a.shape[0]}x{a.shape[1]}.jpg")
        if not os.path.isfile(path):
            image = Image.fromarray(np.ascontiguousarray(a))
            write_atomically(path, lambda tmp: image.save(tmp, "JPEG", quality=quality))  # ranks may race
        paths.append(path)
        info.append((a.shape[0], a.shape[1], "JPEG"))
    return paths, info
