"""Datasets that give two views of one crop, indexed by (epoch, index).

The sampler (``cimfast.pipelines.sampler.EpochSampler``) yields (epoch, index)
pairs; each sample's crop, flip, mask and sampling key are derived from
(seed, epoch, index), so the data of a step never depends on worker count,
rank count or how the run was resumed.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from cimfast.pipelines.demo import demo_images
from cimfast.pipelines.views import SCALE, sample_crop, sample_key, sample_mask, two_views

log = logging.getLogger("cimfast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class TwoViewDataset(Dataset):
    """Base: subclasses implement ``__len__`` and ``load(index) -> uint8 [3, H, W]``.

    ``tok_size`` None gives the one view ``images`` only.

    ``mask_fn(rng) -> array`` (optional) adds a per-sample mask drawn from the
    sample's own mask stream (``views.Stream``). ``scale``: the random crop's
    range of the image's area (``views.SCALE``, torchvision's, by default).
    """

    def __init__(self, size: int, tok_size: int, seed: int = 0,
                 mask_fn: Optional[Callable[[np.random.Generator], np.ndarray]] = None, scale=SCALE):
        self.size, self.tok_size, self.seed, self.mask_fn = size, tok_size, seed, mask_fn
        self.scale = tuple(scale)

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, item):
        epoch, index = item
        img = self.load(index)
        params = sample_crop(self.seed, epoch, index, img.shape[1], img.shape[2], self.scale)
        big, small = two_views(img, params, self.size, self.tok_size)
        out = {"images": big, "sample_key": torch.tensor(sample_key(self.seed, epoch, index))}
        if small is not None:
            out["images_tok"] = small
        mask = sample_mask(self.seed, epoch, index, self.mask_fn)
        if mask is not None:
            out["mask"] = torch.from_numpy(mask)
        return out


class DemoDataset(TwoViewDataset):
    """Random crops of the built-in demo photographs (``samples`` per epoch)."""

    def __init__(self, size: int, tok_size: int, samples: int = 1024, split: str = "train", **kw):
        super().__init__(size, tok_size, **kw)
        self.images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in demo_images(split)]
        self.samples, self.split = samples, split

    def __len__(self):
        return self.samples

    def load(self, index: int) -> torch.Tensor:
        return self.images[index % len(self.images)]


def read_file_list(path: str) -> tuple[list[str], Optional[list]]:
    """The files of a file list, and their (height, width, format) where the list has them.

    One file per line. A line is either ``PATH`` plus optional whitespace-separated
    fields (ImageNet-style ``path label``: the path is the first field), or
    tab-separated ``PATH<TAB>WIDTH<TAB>HEIGHT<TAB>FORMAT`` as written by
    ``python -m cimfast.pipelines.validate`` (paths may then hold spaces).
    Relative paths are relative to the list's folder."""
    base = os.path.dirname(os.path.abspath(path))
    files, info = [], []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            if "\t" in line:
                parts = line.split("\t")
                p = parts[0]
                try:
                    info.append((int(parts[2]), int(parts[1]), parts[3] if len(parts) > 3 else ""))
                except (IndexError, ValueError):
                    info.append(None)
            else:
                p = line.split()[0]
                info.append(None)
            files.append(p if os.path.isabs(p) else os.path.join(base, p))
    return files, (info if info and all(i is not None for i in info) else None)


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (recursively, sorted), or the files of a file list."""
    if os.path.isfile(root):
        return read_file_list(root)[0]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data path {root} is neither a folder of images nor a file list")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_pil(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB with PIL (any format PIL reads; grayscale/CMYK/alpha converted)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def decode_bytes(data: bytes, decoder: str = "auto") -> torch.Tensor:
    """uint8 [3, H, W] RGB from encoded bytes.

    ``auto``: JPEG and PNG with torchvision.io (libjpeg-turbo / libpng, no PIL
    object, about 2x faster than PIL for JPEG), everything else and anything
    torchvision refuses with PIL. ``pil``: PIL only. EXIF orientation is
    ignored on both (as torchvision's ImageFolder and the DALI path do)."""
    if decoder != "pil" and _tv_io() is not None and (data[:3] == JPEG_MAGIC or data[:8] == PNG_MAGIC):
        io_ = _tv_io()
        try:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data[:3] == JPEG_MAGIC:
                img = io_.decode_jpeg(t, mode=io_.ImageReadMode.RGB)
            else:
                img = io_.decode_png(t, mode=io_.ImageReadMode.RGB)
            if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3:
                return img
        except Exception:  # CMYK/YCCK corner cases, 16-bit PNG, odd markers: PIL decides
            pass
    return decode_pil(data)


_TV_IO = []


def _tv_io():
    if not _TV_IO:
        try:
            import warnings

            # torchvision 0.29 deprecates its decoders in favour of TorchCodec (warning on every call);
            # when they are gone, the attribute check below fails and PIL decodes everything
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            import torchvision.io as io_

            io_.decode_jpeg, io_.decode_png, io_.ImageReadMode  # noqa: B018 (all present)
            _TV_IO.append(io_)
        except Exception:
            _TV_IO.append(None)
    return _TV_IO[0]


def decode_file(path: str, decoder: str = "auto") -> torch.Tensor:
    """uint8 [3, H, W] RGB from an image file (see ``decode_bytes``)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file")
    return decode_bytes(data, decoder)


class FileListDataset(TwoViewDataset):
    """Images from files. ``info`` (optional): (height, width, format) per file,
    as the validation found them (the DALI path uses it to skip header parsing).

    A file that cannot be decoded never stops a run: it is replaced by the next
    file of the list that decodes (a warning names it once). The replacement is
    a pure function of the index (the crop, flip, mask and key stay those of
    the index), so a resumed run or the DALI path makes the same choice."""

    MAX_SUBSTITUTES = 64

    def __init__(self, files: list[str], size: int, tok_size: int, info: Optional[list] = None,
                 decoder: str = "auto", **kw):
        super().__init__(size, tok_size, **kw)
        if not files:
            raise ValueError("the file list is empty")
        self.files = list(files)
        self.info = info
        self.decoder = decoder
        self._warned: set = set()

    def __len__(self):
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        first_error = None
        for k in range(min(self.MAX_SUBSTITUTES, len(self.files))):
            j = (index + k) % len(self.files)
            try:
                return decode_file(self.files[j], self.decoder)
            except Exception as e:
                if first_error is None:
                    first_error = e
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("cannot decode %s (%s): using the next image of the list instead; "
                                "validate the data with python -m cimfast.pipelines.validate", self.files[j], e)
        raise RuntimeError(f"cannot decode image {self.files[index]} nor the {self.MAX_SUBSTITUTES - 1} "
                           f"after it: {first_error}") from first_error
