"""Built-in demo data, no download: real photographs that scikit-image ships
in its wheel (and scikit-learn's two sample photos), each training sample a
random resized crop of one of them, so a few photos give many distinct
samples (``PHOTOS`` as a data path); and scikit-learn's handwritten digits
as labelled PNG folders (``DIGITS``: their train split as a data path).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from cimfast.pipelines.atomic import publish_folder, write_atomically

# RGB photographs that load offline from skimage.data (verified 2026-11).
SKIMAGE_RGB = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")
SKIMAGE_GRAY = ("camera", "brick", "grass", "gravel", "moon", "coins", "cell")
# Held out from training: the tokenizer's and the picture's validation photos.
HELD_OUT = ("cat", "coffee", "rocket")
# The data paths of the built-in sets: the digits' train split (pre-training on the kind of images the
# k-NN monitor's demo evaluates on, never on its val split), and the photographs (as no data path).
DIGITS, PHOTOS = "demo:digits", "demo:photos"


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


def demo_digits(split: str, cache_dir: Optional[str] = None) -> str:
    """scikit-learn's digits (8 x 8, 17 grey levels) written once as 64 x 64
    PNG files in class folders; every 4th image is in ``val``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    root = os.path.join(cache_dir or default_cache_dir(), "demo-digits", split)
    if os.path.isdir(root):
        return root
    d = load_digits()

    def fill(tmp: str) -> None:
        for i, (img, y) in enumerate(zip(d.images, d.target)):
            if (i % 4 == 0) != (split == "val"):
                continue
            os.makedirs(os.path.join(tmp, str(y)), exist_ok=True)
            a = np.repeat((img * (255 / 16)).round().astype(np.uint8)[:, :, None], 3, axis=2)
            Image.fromarray(a).resize((64, 64), Image.BILINEAR).save(os.path.join(tmp, str(y), f"{i:04d}.png"))

    return publish_folder(root, fill)  # ranks that race here never see a half-written set
