"""Diagnostics of the CIM objective, computed on the device inside the step:
code counts, balanced accuracies and the trivial baselines beside each loss."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("cimfast")


@torch.no_grad()
def code_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Histogram [vocab] of token ids on the device (``index_add_``: unlike
    ``bincount`` it needs no host read of the largest id)."""
    ids = ids.reshape(-1)
    return torch.zeros(vocab, device=ids.device).index_add_(0, ids, torch.ones(ids.shape, device=ids.device))


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of the true-positive and true-negative rates of boolean ``pred``
    against boolean ``target`` (0.5 for any constant prediction); NaN when a
    class is absent (the Meter leaves NaN out of its means)."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    tpr = (pred & target).sum() / target.sum()
    tnr = (~pred & ~target).sum() / (~target).sum()
    return 0.5 * (tpr + tnr)


def trivial_accuracy(target: torch.Tensor) -> torch.Tensor:
    """Accuracy of always predicting the majority class of a 0/1 ``target``."""
    frac = target.float().mean()
    return torch.maximum(frac, 1 - frac)


def entropy_of_counts(counts: torch.Tensor) -> float:
    """Entropy (nats) of the distribution that ``counts`` estimate."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


class CodeMarginal:
    """The codes at the masked patches, counted on the device since the run
    started (a resumed run continues the checkpoint's counts). Their entropy is the cross-entropy that a generator
    ignoring the image reaches at best (it can only predict the marginal):
    the generator's loss below it (``gen_gap`` > 0) is what it reads from the
    visible patches."""

    def __init__(self, vocab: int, device: torch.device):
        self.counts = torch.zeros(vocab, device=device, dtype=torch.float64)  # exact past 2^24 per code

    def add(self, counts: torch.Tensor) -> None:
        self.counts += counts

    def total(self, world: int) -> torch.Tensor:
        """Every rank's counts summed (a collective: all ranks call it)."""
        total = self.counts.clone()
        if world > 1:
            dist.all_reduce(total)
        return total

    def report(self, world: int) -> dict:
        return {"gen_loss_trivial": entropy_of_counts(self.total(world).cpu())}

    def state(self, world: int) -> list:
        """The run's counts so far, for a checkpoint (all ranks call it)."""
        return self.total(world).cpu().tolist()

    def load(self, counts, rank: int) -> None:
        """A checkpoint's counts, held by rank 0 (the sum over ranks is what counts)."""
        if counts is not None and rank == 0:
            self.counts.copy_(torch.tensor(counts, dtype=torch.float64))


class ReplacedWatch:
    """Warns when ``replaced_frac`` stays near 1 (the generator's samples are
    noise: the enhancer sees a random mosaic) or near 0 (it copies the
    original: nothing to restore or detect) for a long stretch: at least
    ``min_reports`` log records and ``min_frac`` of the run."""

    def __init__(self, max_steps: int, low: float = 0.02, high: float = 0.98, min_reports: int = 3,
                 min_frac: float = 0.25):
        self.low, self.high, self.min_reports = low, high, min_reports
        self.min_steps = min_frac * max_steps
        self.since, self.reports, self.warned = None, 0, False

    def state(self) -> dict:
        return {"since": self.since, "reports": self.reports, "warned": self.warned}

    def load(self, state) -> None:
        if state:
            self.since, self.reports, self.warned = state["since"], state["reports"], state["warned"]

    def check(self, step: int, frac: float) -> Optional[str]:
        side = "1" if frac > self.high else "0" if frac < self.low else None
        if side is None:
            self.since, self.reports, self.warned = None, 0, False
            return None
        if self.since is None:
            self.since = step
        self.reports += 1
        if self.warned or self.reports < self.min_reports or step - self.since < self.min_steps:
            return None
        self.warned = True
        why = ("the generator's samples are nearly all wrong: the corrupted images are random mosaics. "
               "It has not learned the codes yet; a lower --temperature or a longer run helps"
               if side == "1" else
               "the generator nearly always samples the original code: there is little left to restore "
               "or detect. A higher --temperature makes its samples harder")
        msg = f"replaced_frac has stayed near {side} since step {self.since} (now {frac:.3f}): {why}"
        log.warning(msg)
        return msg
