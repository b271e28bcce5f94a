"""BEiT blockwise masking, with an exact count.

BEiT's generator (``MaskingGenerator`` in its repository) places random
rectangles of at least ``min_block`` patches with aspect ratio in
[``min_aspect``, 1/``min_aspect``] until about ``num_masked`` patches are
covered. Two changes make its output exact and its constraints checkable:
a rectangle whose rounded sides give an area below ``min_block`` or an
aspect ratio outside the bounds is rejected, and when
no rectangle fits the remaining budget the mask grows by random patches
adjacent to it, so every connected masked region still holds at least
``min_block`` patches and the count is exactly ``num_masked``.

Masks are a pure function of a seed: the data loader makes them per sample
from (run seed, epoch, sample index) in its worker threads, off the training
step, and a resumed run recomputes the same ones.
"""
from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    def __init__(self, grid: int | tuple[int, int], num_masked: int, min_block: int = 16,
                 max_block: int | None = None, min_aspect: float = 0.3):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        n = self.height * self.width
        if not 0 <= num_masked <= n:
            raise ValueError(f"num_masked={num_masked} must be between 0 and the {n} patches of a "
                             f"{self.height}x{self.width} grid")
        if min_block < 1:
            raise ValueError(f"min_block={min_block} must be at least 1")
        if 0 < num_masked < min_block:
            raise ValueError(f"num_masked={num_masked} is smaller than min_block={min_block}: "
                             "no block fits; lower min_block or mask more patches")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")
        self.num_masked = num_masked
        self.min_block = min_block
        self.max_block = num_masked if max_block is None else max_block
        self.min_aspect = min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w < self.min_block or h >= self.height or w >= self.width \
                    or not self.min_aspect <= h / w <= 1 / self.min_aspect:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                return new
        return 0

    def _grow(self, mask: np.ndarray, count: int, rng: np.random.Generator) -> None:
        while count > 0:
            near = np.zeros_like(mask)
            near[1:] |= mask[:-1]
            near[:-1] |= mask[1:]
            near[:, 1:] |= mask[:, :-1]
            near[:, :-1] |= mask[:, 1:]
            frontier = np.flatnonzero(near & ~mask)
            take = rng.choice(frontier, size=min(count, len(frontier)), replace=False)
            mask.flat[take] = True
            count -= len(take)

    def __call__(self, rng: np.random.Generator | int) -> np.ndarray:
        """One mask [height, width] of bools with exactly ``num_masked`` True."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            budget = min(self.num_masked - count, self.max_block)
            delta = self._place_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        if count == 0 and self.num_masked > 0:  # grid too small for any rectangle: seed one patch
            mask.flat[int(rng.integers(mask.size))] = True
            count = 1
        self._grow(mask, self.num_masked - count, rng)
        return mask

    def batch(self, seeds) -> np.ndarray:
        """Masks [len(seeds), height * width] for a sequence of integer seeds or seed tuples."""
        return np.stack([self(np.random.default_rng(s)).reshape(-1) for s in seeds])
