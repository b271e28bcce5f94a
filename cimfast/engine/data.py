"""The training data: the dataset (the run's images or the demo photographs,
with cimfast's epoch order and a mask per sample) and the choice of the input
pipeline that makes its batches.

``build_batches`` returns an endless iterator of this rank's micro-batches
(dicts: images, images_tok, sample_key, mask) from a global micro-step on,
made by the first pipeline that works of

    DALI on the GPU  ->  torch DataLoader (torchvision.io / PIL)

(``pipeline`` setting ``auto``), or the one the setting names (``dali-gpu``,
``dali-cpu``, ``torch``, or ``synthetic`` for compute-only benchmarks). All of
them give the same samples in the same order with the same crops, flips,
masks and keys (counter-based: see cimfast.pipelines.views), so the choice
never changes what a run sees beyond the decoders' rounding. A ``data_path``
is validated first (cached; bad files are left out and counted).
"""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional

import torch

from cimfast.config.settings import PIPELINES, Config, InputError, RunConfig
from cimfast.objective.masking import BlockMaskGenerator
from cimfast.pipelines.dali import dali_batches
from cimfast.pipelines.datasets import DemoDataset, FileListDataset, list_images, read_file_list
from cimfast.pipelines.demo import DIGITS, PHOTOS, demo_digits
from cimfast.pipelines.sampler import build_loader
from cimfast.pipelines.synthetic import SyntheticBatches
from cimfast.pipelines.validate import DEFAULT_MAX_PIXELS, validate

log = logging.getLogger("cimfast")


def build_dataset(cfg: Config, run: RunConfig):
    """CIM's data: both views and a blockwise mask per sample."""
    masks = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block)
    return build_image_dataset(run, cfg.img_size, cfg.tok_size, masks)


def build_image_dataset(run: RunConfig, size: int, tok_size, mask_fn):
    """The run's images (``data_path``, validated, or the demo photographs) as random crops."""
    kw = dict(seed=run.seed, mask_fn=mask_fn, scale=run.crop_scale)
    if run.data_path and run.data_path != PHOTOS:
        files, info = data_files(run)
        return FileListDataset(files, size, tok_size, info=info, **kw)
    log.info("data: the built-in demo photographs (%d crops per epoch)", run.demo_samples)
    return DemoDataset(size, tok_size, samples=run.demo_samples, **kw)


def data_files(run: RunConfig) -> tuple[list, Optional[list]]:
    """The usable files of ``run.data_path`` and their (height, width, format):
    validated (cached by path, size and mtime of every file) unless the
    ``validate_data`` setting is off. ``demo:digits``: the demo digits' train split (written once)."""
    path = run.data_path
    if path == DIGITS:
        path = demo_digits("train", run.cache_dir)
        log.info("data: %s, the demo digits' train split (their val split is never trained on)", DIGITS)
    try:
        if not run.validate_data:
            if os.path.isfile(path):
                files, info = read_file_list(path)
            else:
                files, info = list_images(path), None
            log.info("data: %d images from %s (not validated)", len(files), path)
            return files, info
        v = validate(path, max_pixels=run.max_image_pixels or DEFAULT_MAX_PIXELS, cache_dir=run.cache_dir)
    except FileNotFoundError as e:  # no images under the path, a file list naming missing files
        raise InputError(f"{e}: pass --data_path with a folder of images or a file list") from None
    s = v.summary
    if not v.files:
        raise InputError(f"data path {run.data_path}: none of its {s['total']} images is usable "
                         f"(see {os.path.splitext(v.clean_list)[0]}.summary.json)")
    left = {k: s[k] for k in ("empty", "truncated", "corrupt", "not_image", "too_large", "unreadable") if s[k]}
    log.info("data: %d images from %s (validated: %d checked, %d cached; clean list %s)", len(v.files),
             run.data_path, s["checked"], s["cached"], v.clean_list)
    if left:
        log.warning("data: %d of %d files left out (%s); the list is in %s.summary.json", s["bad"], s["total"],
                    ", ".join(f"{k} {n}" for k, n in left.items()), os.path.splitext(v.clean_list)[0])
    return v.files, v.info


class _Primed:
    """An iterator with its first item already taken (to check that a pipeline works)."""

    def __init__(self, first, it):
        self._first, self._it = [first], it

    def __iter__(self):
        return self

    def __next__(self):
        if self._first:
            return self._first.pop()
        return next(self._it)

    def __getattr__(self, name):  # epoch, step, ... of the wrapped iterator
        return getattr(self.__dict__["_it"], name)


_LOGGED: set = set()


def _log_once(msg: str, *args) -> None:
    key = msg % args
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(msg, *args)


def pipeline_candidates(choice: str, device: torch.device) -> list[str]:
    if choice not in PIPELINES:
        raise ValueError(f"pipeline: must be one of {', '.join(PIPELINES)}, got {choice!r}")
    if choice != "auto":
        return [choice]
    # DALI's CPU path is not in auto: on a 2-core CPU it measured 0.88x the
    # torch path (torchvision.io decoding, uint8 resizing); ask for it by name.
    return (["dali-gpu"] if device.type == "cuda" else []) + ["torch"]


def build_batches(dataset, run: RunConfig, micro: int, start_micro_step: int, device,
                  rank: int, world: int) -> Iterator[dict]:
    """Endless iterator of this rank's micro-batches of ``dataset`` from global
    micro-step ``start_micro_step`` on, from the pipeline the ``pipeline``
    setting names (``auto``: DALI on the GPU where it works, else torch); the
    choice is logged once. Tensors are uint8 images (floats are made on the
    device), on the CPU (pinned with ``pin_memory``) or already on
    ``device`` (DALI on the GPU, synthetic)."""
    device = torch.device(device)
    candidates = pipeline_candidates(run.pipeline, device)
    if candidates == ["synthetic"]:
        _log_once("data pipeline: synthetic batches on %s (compute-only benchmark: no images are read)", device)
        return SyntheticBatches(micro, dataset.size, dataset.tok_size, device, mask_fn=dataset.mask_fn,
                                seed=run.seed, rank=rank, world=world, start_step=start_micro_step)

    def torch_batches(step: int):
        return iter(build_loader(dataset, micro, rank, world, run.seed, step, run.num_workers,
                                 pin_memory=run.pin_memory))

    skipped = []
    for name in candidates:
        if name == "torch":
            decoder = "torchvision.io for JPEG/PNG, PIL for the rest" if isinstance(dataset, FileListDataset) \
                else "images in memory"
            _log_once("data pipeline: torch DataLoader, %d worker(s), %s%s%s", run.num_workers, decoder,
                      ", pinned memory" if run.pin_memory else "",
                      f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return torch_batches(start_micro_step)
        try:
            it, desc = dali_batches(name, dataset, rank, world, micro, start_micro_step, device,
                                    cache_dir=run.cache_dir, threads=run.dali_threads, py_workers=run.num_workers,
                                    torch_batches=torch_batches)
            first = next(it)  # a pipeline that cannot make its first batch is not chosen
        except Exception as e:
            if run.pipeline != "auto":
                raise RuntimeError(f"pipeline {name} (set by the pipeline setting) does not work here: {e}") from e
            skipped.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        _log_once("data pipeline: %s%s", desc, f" (skipped: {'; '.join(skipped)})" if skipped else "")
        return _Primed(first, it)
    raise RuntimeError(f"no input pipeline works: {'; '.join(skipped)}")


def fixed_batch(dataset, n: int) -> dict:
    """A fixed batch for the pictures (the same in every run with the same seed): samples
    spread evenly over the dataset, whose files come sorted (class by class in a labelled
    folder: the first n are often one class)."""
    count = min(n, len(dataset))
    items = [dataset[(0, i * len(dataset) // count)] for i in range(count)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
