"""Batches on the training device, one step ahead.

``DevicePrefetcher`` wraps an iterator of dict batches (CPU tensors, pinned
by the DataLoader on CUDA, or tensors already on the device) and keeps the
next batch's host-to-device copy in flight while the current step runs. On
CUDA the copy is issued on a side stream, so it overlaps the step's kernels;
the compute stream waits for it (an event, not a host sync) only when the
batch is taken. Elsewhere the copies are plain ``non_blocking`` copies.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch


class DevicePrefetcher:
    def __init__(self, batches: Iterator[dict], device: torch.device):
        self.batches, self.device = batches, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.wait_s = 0.0  # host time spent waiting for the loader
        self._next = self._load()

    def _load(self) -> dict:
        t0 = time.perf_counter()
        host = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        if self.stream is None:
            return {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        with torch.cuda.stream(self.stream):
            return {k: v.to(self.device, non_blocking=True) for k, v in host.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._next
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for v in batch.values():  # the memory was allocated on the side stream
                v.record_stream(current)
        self._next = self._load()
        return batch

    def take_wait(self) -> float:
        """Seconds waited for the loader since the last call."""
        w, self.wait_s = self.wait_s, 0.0
        return w
