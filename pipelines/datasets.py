"""Datasets that give two views of one crop, indexed by (epoch, index).

The sampler (``cimfast.pipelines.sampler.EpochSampler``) yields (epoch, index)
pairs; each sample's crop, flip, mask and sampling key are derived from
(seed, epoch, index), so the data of a step never depends on worker count,
rank count or how the run was resumed.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from cimfast.pipelines.views import crop_params, sample_rng, two_views

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class TwoViewDataset(Dataset):
    """Base: subclasses implement ``__len__`` and ``load(index) -> uint8 [3, H, W]``.

    ``tok_size`` None gives the one view ``images`` only.

    ``mask_fn(rng) -> array`` (optional) adds a per-sample mask drawn from the
    sample's own generator (stream 1).
    """

    def __init__(self, size: int, tok_size: int, seed: int = 0,
                 mask_fn: Optional[Callable[[np.random.Generator], np.ndarray]] = None):
        self.size, self.tok_size, self.seed, self.mask_fn = size, tok_size, seed, mask_fn

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, item):
        epoch, index = item
        img = self.load(index)
        params = crop_params(sample_rng(self.seed, epoch, index, 0), img.shape[1], img.shape[2])
        big, small = two_views(img, params, self.size, self.tok_size)
        out = {"images": big, "sample_key": torch.tensor(int(sample_rng(self.seed, epoch, index, 2).integers(1 << 32)))}
        if small is not None:
            out["images_tok"] = small
        if self.mask_fn is not None:
            out["mask"] = torch.from_numpy(np.asarray(self.mask_fn(sample_rng(self.seed, epoch, index, 1))).reshape(-1))
        return out


class DemoDataset(TwoViewDataset):
    """Random crops of the built-in demo photographs (``samples`` per epoch)."""

    def __init__(self, size: int, tok_size: int, samples: int = 1024, split: str = "train", **kw):
        super().__init__(size, tok_size, **kw)
        from cimfast.pipelines.demo import demo_images

        self.images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in demo_images(split)]
        self.samples = samples

    def __len__(self):
        return self.samples

    def load(self, index: int) -> torch.Tensor:
        return self.images[index % len(self.images)]


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (recursively, sorted), or the lines of a file list."""
    if os.path.isfile(root):
        with open(root) as f:
            files = [line.split()[0] for line in f if line.strip()]
        base = os.path.dirname(os.path.abspath(root))
        return [p if os.path.isabs(p) else os.path.join(base, p) for p in files]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path {root} is neither a folder of images nor a file list")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def decode_file(path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB from an image file (PIL; grayscale/CMYK/alpha converted)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


class FileListDataset(TwoViewDataset):
    def __init__(self, files: list[str], size: int, tok_size: int, **kw):
        super().__init__(size, tok_size, **kw)
        if not files:
            raise ValueError("the file list is empty")
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        try:
            return decode_file(self.files[index])
        except Exception as e:
            raise RuntimeError(f"cannot decode image {self.files[index]}: {e}") from e
