"""Labelled image folders for evaluation: class subfolders (or the demo
digits), validated like pre-training data, sharded over the ranks, and
turned into evaluation views (resize to size / 0.875, centre crop)."""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch

from cimfast.config.settings import InputError
from cimfast.objective.cim import IMAGENET_MEAN, IMAGENET_STD
from cimfast.pipelines.datasets import decode_file
from cimfast.pipelines.demo import demo_digits
from cimfast.pipelines.validate import validate

log = logging.getLogger("cimfast")


EVAL_CROP = 0.875  # resize to size / 0.875, centre crop (224 from 256)


def labelled_files(path: str, cache_dir: Optional[str] = None) -> tuple[list, list, list]:
    """(files, labels, class names) of a folder with one subfolder per class
    (``demo``: the digits); bad files are left out and counted."""

    if path in ("demo", "demo:train", "demo:val"):
        raise InputError("pass demo for both --train_path and --val_path (the train and val digits)")
    if not os.path.isdir(path):
        raise InputError(f"{path} is not a folder (one subfolder of images per class expected)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise InputError(f"{path} has no class subfolders (one subfolder of images per class expected)")
    try:
        v = validate(path, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    root = os.path.abspath(path)
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for f in v.files:
        top = os.path.relpath(f, root).split(os.sep)[0]
        if top in index:
            files.append(f)
            labels.append(index[top])
    if v.summary["bad"]:
        log.warning("%s: %d of %d files left out (not decodable); see %s", path, v.summary["bad"],
                    v.summary["total"], os.path.splitext(v.clean_list)[0] + ".summary.json")
    if not files:
        raise InputError(f"{path}: no usable images in its class subfolders")
    return files, labels, classes


def resolve_paths(train_path: str, val_path: str, cache_dir: Optional[str] = None) -> tuple[str, str]:
    """The two labelled folders (``demo``: the digits, written once into the cache); a missing
    folder is named before anything is loaded."""
    for flag, path in (("--train_path", train_path), ("--val_path", val_path)):
        if path != "demo" and not os.path.isdir(path):
            raise InputError(f"{flag} {path} is not a folder: give one with a subfolder of images per class, "
                             "or demo")
    if (train_path == "demo") != (val_path == "demo"):
        raise InputError("--train_path and --val_path: demo must be given for both or neither")
    if train_path == "demo":
        return demo_digits("train", cache_dir), demo_digits("val", cache_dir)
    return train_path, val_path


def check_same_classes(train_path: str, classes: list, val_path: str, val_classes: list) -> None:
    """A labelled val set must name the train set's classes, in the same order (labels are their indices)."""
    if val_classes != classes:
        raise InputError(f"{val_path}: its class folders differ from those of {train_path}")


def eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: shorter side to size / 0.875, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    img = TF.resize(img, int(round(size / EVAL_CROP)), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(img, [size, size])


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, files: list, labels: list, size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):

        return eval_view(decode_file(self.files[i]), self.size), self.labels[i]


def shard(n: int, rank: int, world: int) -> tuple[list, torch.Tensor]:
    """This rank's share of ``n`` items (every ``world``-th, padded with the last
    item to equal length on every rank) and their global indices (-1: padding)."""
    idx = [rank + j * world for j in range(math.ceil(n / world))]
    return [min(i, n - 1) for i in idx], torch.tensor([i if i < n else -1 for i in idx])


class ViewSource:
    """This rank's share of a labelled set as uint8 evaluation views: decoded
    once and kept in memory when they fit ``cache_bytes`` (the k-NN monitor's
    small sets), else decoded again at each pass (a one-off evaluation)."""

    def __init__(self, files: list, labels: list, size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 cache_bytes: int = 0):
        picks, self.index = shard(len(files), rank, world)
        self.labels = torch.tensor([labels[i] for i in picks])
        self.data = torch.utils.data.Subset(LabelledImages(files, labels, size), picks)
        self.num_workers, self.cached = num_workers, None
        if len(picks) * 3 * size * size <= cache_bytes:
            self.cached = torch.cat([v for v, _ in self.batches()])

    def batches(self, batch: int = 64):
        if self.cached is not None:
            yield from ((self.cached[i:i + batch], None) for i in range(0, len(self.cached), batch))
            return
        yield from torch.utils.data.DataLoader(self.data, batch_size=batch, num_workers=self.num_workers)


def normalized(views: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 views -> ImageNet-normalized ``dtype`` on ``device`` (as the enhancer saw in pre-training)."""

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((views.to(device).float() / 255 - mean) / std).to(dtype)
