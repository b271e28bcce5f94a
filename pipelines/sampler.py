"""Epoch order made by cimfast: a seeded permutation per epoch, cut into
global batches, each rank taking its slice. Resume starts at a global sample
position; the same global batch on 1 or N ranks covers the same samples."""
from __future__ import annotations

import signal
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler):
    def __init__(self, num_samples: int, batch_per_rank: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, start_step: int = 0):
        self.n, self.b, self.rank, self.world = num_samples, batch_per_rank, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_per_rank * world
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples do not fill one global batch of {self.global_batch}")
        self.start_step = start_step

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global micro-step."""
        return divmod(int(step), self.steps_per_epoch)

    def step_indices(self, step: int, order: Optional[np.ndarray] = None) -> tuple[int, np.ndarray]:
        """(epoch, this rank's sample indices) of global micro-step ``step``: a
        pure function of the step (``order``: this epoch's ``order(epoch)``, if
        the caller keeps it)."""
        epoch, k = self.position(step)
        if order is None:
            order = self.order(epoch)
        lo = k * self.global_batch + self.rank * self.b
        return epoch, order[lo:lo + self.b]

    def __iter__(self):
        """Endless: (epoch, index) pairs, this rank's share of global step after step."""
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            order = self.order(epoch)
            for s in range(k, self.steps_per_epoch):
                lo = s * self.global_batch + self.rank * self.b
                for i in order[lo:lo + self.b]:
                    yield epoch, int(i)
            step = (epoch + 1) * self.steps_per_epoch

    def __len__(self):
        return self.steps_per_epoch * self.b


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM. Ctrl-C reaches the whole
    process group and launchers signal the whole process tree; a worker that
    died of it would take its rank down mid-step. The rank decides when to
    stop (after its step and checkpoint) and then shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(dataset, micro_batch: int, rank: int, world: int, seed: int, start_micro_step: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    """Endless loader of this rank's micro-batches, starting at a global micro-step."""
    sampler = EpochSampler(len(dataset), micro_batch, rank, world, seed=seed, start_step=start_micro_step)
    return DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, worker_init_fn=ignore_stop_signals,
                      prefetch_factor=4 if num_workers else None, persistent_workers=num_workers > 0)
