"""The training data: dataset + cimfast's epoch order + masks, on the loader's
workers (off the training step), and the copy to the device."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from cimfast.config import Config, RunConfig
from cimfast.masking import BlockMaskGenerator
from cimfast.pipelines.datasets import DemoDataset, FileListDataset, list_images
from cimfast.pipelines.sampler import EpochSampler

log = logging.getLogger("cimfast")


def build_dataset(cfg: Config, run: RunConfig):
    """CIM's data: both views and a blockwise mask per sample."""
    masks = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block)
    return build_image_dataset(run, cfg.img_size, cfg.tokenizer_size, masks)


def build_image_dataset(run: RunConfig, size: int, tok_size, mask_fn):
    """The run's images (``data_path`` or the demo photographs) as random crops."""
    kw = dict(seed=run.seed, mask_fn=mask_fn)
    if run.data_path:
        files = list_images(run.data_path)
        log.info("data: %d images from %s", len(files), run.data_path)
        return FileListDataset(files, size, tok_size, **kw)
    log.info("data: the built-in demo photographs (%d crops per epoch)", run.demo_samples)
    return DemoDataset(size, tok_size, samples=run.demo_samples, **kw)


def build_loader(dataset, micro_batch: int, rank: int, world: int, seed: int, start_micro_step: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    """Endless loader of this rank's micro-batches, starting at a global micro-step."""
    sampler = EpochSampler(len(dataset), micro_batch, rank, world, seed=seed, start_step=start_micro_step)
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True,
                      prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fixed_batch(dataset, n: int) -> dict:
    """A fixed batch for the pictures (the same in every run with the same seed)."""
    items = [dataset[(0, i)] for i in range(min(n, len(dataset)))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
