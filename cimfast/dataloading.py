"""The training data: dataset + cimfast's epoch order + masks, and the choice
of the input pipeline that makes the batches.

``build_batches`` returns an endless iterator of this rank's micro-batches
(dicts: images, images_tok, sample_key, mask) from a global micro-step on,
made by the first pipeline that works of

    DALI on the GPU  ->  DALI on the CPU  ->  torch DataLoader (torchvision.io / PIL)

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
from torch.utils.data import DataLoader

from cimfast.config import PIPELINES, Config, RunConfig
from cimfast.masking import BlockMaskGenerator
from cimfast.pipelines.datasets import DemoDataset, FileListDataset, TwoViewDataset
from cimfast.pipelines.sampler import EpochSampler

log = logging.getLogger("cimfast")

PIPELINE_CHOICES = PIPELINES


def build_dataset(cfg: Config, run: RunConfig):
    """CIM's data: both views and a blockwise mask per sample."""
    masks = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block)
    return build_image_dataset(run, cfg.img_size, cfg.tokenizer_size, masks)


def build_image_dataset(run: RunConfig, size: int, tok_size, mask_fn):
    """The run's images (``data_path``, validated, or the demo photographs) as random crops."""
    kw = dict(seed=run.seed, mask_fn=mask_fn)
    if run.data_path:
        files, info = data_files(run)
        return FileListDataset(files, size, tok_size, info=info, **kw)
    log.info("data: the built-in demo photographs (%d crops per epoch)", run.demo_samples)
    return DemoDataset(size, tok_size, samples=run.demo_samples, **kw)


def data_files(run: RunConfig) -> tuple[list, Optional[list]]:
    """The usable files of ``run.data_path`` and their (height, width, format):
    validated (cached by path, size and mtime of every file) unless the
    ``validate_data`` setting is off."""
    from cimfast.pipelines.datasets import list_images, read_file_list
    from cimfast.pipelines.validate import DEFAULT_MAX_PIXELS, validate

    if not getattr(run, "validate_data", True):
        if os.path.isfile(run.data_path):
            files, info = read_file_list(run.data_path)
        else:
            files, info = list_images(run.data_path), None
        log.info("data: %d images from %s (not validated)", len(files), run.data_path)
        return files, info
    v = validate(run.data_path, max_pixels=getattr(run, "max_image_pixels", None) or DEFAULT_MAX_PIXELS,
                 cache_dir=getattr(run, "cache_dir", None) or None)
    s = v.summary
    if not v.files:
        raise FileNotFoundError(f"data path {run.data_path}: none of its {s['total']} images is usable "
                                f"(see {os.path.splitext(v.clean_list)[0]}.summary.json)")
    left = {k: s[k] for k in ("empty", "truncated", "corrupt", "not_image", "too_large", "unreadable") if s[k]}
    log.info("data: %d images from %s (validated: %d checked, %d cached; clean list %s)", len(v.files),
             run.data_path, s["checked"], s["cached"], v.clean_list)
    if left:
        log.warning("data: %d of %d files left out (%s); the list is in %s.summary.json", s["bad"], s["total"],
                    ", ".join(f"{k} {n}" for k, n in left.items()), os.path.splitext(v.clean_list)[0])
    return v.files, v.info


def build_loader(dataset, micro_batch: int, rank: int, world: int, seed: int, start_micro_step: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    """Endless loader of this rank's micro-batches, starting at a global micro-step."""
    sampler = EpochSampler(len(dataset), micro_batch, rank, world, seed=seed, start_step=start_micro_step)
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True,
                      prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0)


def demo_jpeg_files(split: str = "train", cache_dir: Optional[str] = None, quality: int = 95) -> tuple[list, list]:
    """The demo photographs written once as JPEG files (for readers that need
    files): (paths, (height, width, "JPEG") per path)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from cimfast.pipelines.demo import demo_images
    from cimfast.pipelines.validate import default_cache_dir

    folder = os.path.join(cache_dir or default_cache_dir(), f"demo-jpeg-q{quality}", split)
    os.makedirs(folder, exist_ok=True)
    paths, info = [], []
    for i, a in enumerate(demo_images(split)):
        path = os.path.join(folder, f"{i:03d}_{a.shape[0]}x{a.shape[1]}.jpg")
        if not os.path.isfile(path):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".jpg.tmp")
            with os.fdopen(fd, "wb") as f:
                Image.fromarray(np.ascontiguousarray(a)).save(f, "JPEG", quality=quality)
            os.replace(tmp, path)  # atomic: ranks writing at once are harmless
        paths.append(path)
        info.append((a.shape[0], a.shape[1], "JPEG"))
    return paths, info


def _dataset_files(dataset, run) -> tuple[Optional[list], Optional[list], str]:
    """(files, info, why not) for a DALI reader of ``dataset``."""
    if isinstance(dataset, FileListDataset):
        return dataset.files, dataset.info, ""
    if isinstance(dataset, DemoDataset):
        split = getattr(dataset, "split", "train")
        paths, info = demo_jpeg_files(split, getattr(run, "cache_dir", None) or None)
        if len(paths) != len(dataset.images):
            return None, None, "the demo photographs changed while writing them"
        n = len(paths)
        return [paths[i % n] for i in range(len(dataset))], [info[i % n] for i in range(len(dataset))], ""
    return None, None, f"{type(dataset).__name__} has no image files"


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
    if choice not in PIPELINE_CHOICES:
        raise ValueError(f"pipeline: must be one of {', '.join(PIPELINE_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return [choice]
    # DALI's CPU path is not in auto: on a 2-core CPU it measured 0.88x the
    # torch path (torchvision.io decoding, uint8 resizing); ask for it by name.
    return (["dali-gpu"] if device.type == "cuda" else []) + ["torch"]


def build_batches(cfg: Optional[Config], run: RunConfig, rank: int, world: int, micro: int, start_micro_step: int,
                  device, dataset=None) -> Iterator[dict]:
    """Endless iterator of this rank's micro-batches from global micro-step
    ``start_micro_step`` on, from the pipeline the ``pipeline`` setting names
    (``auto``: the first that works of dali-gpu, dali-cpu, torch); the choice
    is logged once. ``dataset`` (default ``build_dataset(cfg, run)``) gives the
    files, sizes, seed and mask function; tensors may already be on ``device``
    (``to_device`` is then free)."""
    device = torch.device(device)
    choice = getattr(run, "pipeline", "auto") or "auto"
    candidates = pipeline_candidates(choice, device)
    if candidates == ["synthetic"]:
        from cimfast.pipelines.synthetic import SyntheticBatches

        if dataset is not None:
            size, tok, mask_fn = dataset.size, dataset.tok_size, dataset.mask_fn
        else:
            size, tok = cfg.img_size, cfg.tokenizer_size
            mask_fn = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block)
        _log_once("data pipeline: synthetic batches on %s (compute-only benchmark: no images are read)", device)
        return SyntheticBatches(micro, size, tok, device, mask_fn=mask_fn, seed=run.seed, rank=rank, world=world,
                                start_step=start_micro_step)
    if dataset is None:
        dataset = build_dataset(cfg, run)
    workers = getattr(run, "num_workers", 2)

    def torch_batches(step: int):
        return iter(build_loader(dataset, micro, rank, world, run.seed, step, workers,
                                 pin_memory=device.type == "cuda"))

    skipped = []
    for name in candidates:
        if name == "torch":
            it = torch_batches(start_micro_step)
            decoder = "torchvision.io for JPEG/PNG, PIL for the rest" if isinstance(dataset, FileListDataset) \
                else "images in memory"
            _log_once("data pipeline: torch DataLoader, %d worker(s), %s%s", workers, decoder,
                      f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return it
        try:
            it, desc = _dali_batches(name, dataset, run, rank, world, micro, start_micro_step, device, torch_batches)
            first = next(it)  # a pipeline that cannot make its first batch is not chosen
        except Exception as e:
            if choice != "auto":
                raise RuntimeError(f"pipeline {name} (set by the pipeline setting) does not work here: {e}") from e
            skipped.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        _log_once("data pipeline: %s%s", desc, f" (skipped: {'; '.join(skipped)})" if skipped else "")
        return _Primed(first, it)
    raise RuntimeError(f"no input pipeline works: {'; '.join(skipped)}")


def _dali_batches(name, dataset, run, rank, world, micro, start, device, torch_batches):
    from cimfast.pipelines.dali import DaliBatches, dali_import_error, dali_threads

    err = dali_import_error()
    if err:
        raise RuntimeError(f"nvidia-dali does not import ({err}); pip install nvidia-dali-cuda130 "
                           "(or -cuda120, matching your torch's CUDA)")
    if not isinstance(dataset, TwoViewDataset):
        raise RuntimeError(f"{type(dataset).__name__} is not a TwoViewDataset")
    gpu = name == "dali-gpu"
    if gpu and device.type != "cuda":
        raise RuntimeError("training does not run on a CUDA device")
    files, info, why = _dataset_files(dataset, run)
    if files is None:
        raise RuntimeError(why)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = dali_threads("gpu" if gpu else "cpu", local_world, int(getattr(run, "dali_threads", 0) or 0))
    py_workers = int(getattr(run, "num_workers", 0) or 0)
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    it = DaliBatches(files, dataset.size, dataset.tok_size, micro, rank, world, seed=dataset.seed, start_step=start,
                     mask_fn=dataset.mask_fn, info=info, device="gpu" if gpu else "cpu", device_id=device_id,
                     threads=threads, py_workers=py_workers, fallback=torch_batches)
    import nvidia.dali as dali

    where = f"decoding on cuda:{device_id} (nvJPEG)" if gpu else "decoding on the CPU"
    desc = (f"{name}: DALI {dali.__version__}, {threads} thread(s), {py_workers or 'no'} source worker process(es), "
            f"{where}, {len(files)} files")
    return it, desc


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fixed_batch(dataset, n: int) -> dict:
    """A fixed batch for the pictures (the same in every run with the same seed)."""
    items = [dataset[(0, i)] for i in range(min(n, len(dataset)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
