"""What keeps the step loop free of host syncs: the non-finite loss guard and
the stop request, both decided without reading the device between log
intervals.

Non-finite losses. A step in which any rank's loss is not finite is skipped
on the device: the flag is OR-ed over the step's micro-batches, all-reduced
over ranks (a device collective, no host read) and handed to the optimizer
as ``found_inf``, the argument torch's fused Adam/AdamW/SGD take from
``GradScaler``: with it set the fused kernel leaves weights, moments and the
step count untouched. A non-finite gradient norm with a finite loss is
OR-ed in by the ZeRO-1/2 clipping (``cimfast.engine.patches``). Counts (skipped steps, the longest
run of them) stay on the device and are read with the metrics at the log
interval. A skipped step still advances the learning-rate schedule by one.
An optimizer without ``found_inf`` (DeepSpeed's own FusedAdam, a foreach
torch AdamW) falls back to the exact host-side check: one read per
micro-step, the bad micro-batch skipped before its backward and counted,
``limit`` of them in a row stop the run (DeepSpeed's own overflow check then
stays on for the gradients). The choice is logged once; write ``"fused":
true`` beside ``"torch_adam": true`` in the optimizer's params for the
device path.
"""
from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("cimfast")


def _inner_optimizers(optimizer):
    """The optimizer and the ones it wraps (DeepSpeed's ZeRO/bf16 wrappers keep theirs in ``.optimizer``)."""
    seen = []
    while optimizer is not None and optimizer not in seen:
        seen.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return seen


def device_skip_optimizer(optimizer):
    """The torch optimizer inside ``optimizer`` that honours ``found_inf``, or None."""
    for opt in _inner_optimizers(optimizer):
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and opt.defaults.get("fused"):
            return opt
    return None


class NonFiniteGuard:
    """Skips non-finite steps (on the device, or on the host as a fallback) and counts them."""

    def __init__(self, optimizer, device: torch.device, world: int, total: int = 0, limit: int = 5):
        self.world, self.limit = world, limit
        self.opt = device_skip_optimizer(optimizer)
        self.on_device = self.opt is not None
        self.bad = torch.zeros((), dtype=torch.bool, device=device)        # this step, this rank
        self.total = torch.full((), total, dtype=torch.int64, device=device)  # skipped steps
        self.row = torch.zeros((), dtype=torch.int64, device=device)        # skipped in a row, now
        self.longest = torch.zeros((), dtype=torch.int64, device=device)    # longest row since the last read
        self._host_total, self._host_row = total, 0
        if self.on_device:
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
            self.opt.found_inf = self.found_inf
            log.info("non-finite losses and gradients: the step is skipped on the device (%s found_inf)",
                     type(self.opt).__name__)
        else:
            names = " > ".join(type(o).__name__ for o in _inner_optimizers(optimizer))
            log.info("non-finite losses: checked on the host at every micro-step (the optimizer %s has no "
                     "found_inf; \"torch_adam\": true with \"fused\": true in ds_config's optimizer params "
                     "skips on the device)", names or "none")

    @property
    def exhausted(self) -> bool:
        """The host path saw ``limit`` non-finite micro-batches in a row: stop now."""
        return self._host_row >= self.limit

    def skip(self, loss: torch.Tensor) -> bool:
        """Record one micro-step's loss. True: leave this micro-batch out (host path only)."""
        bad = ~torch.isfinite(loss.detach())
        if self.on_device:
            torch.logical_or(self.bad, bad, out=self.bad)
            return False
        flag = bad.to(torch.int64)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():  # the host path's sync
            self._host_total += 1
            self._host_row += 1
            log.warning("non-finite loss: micro-batch skipped (%d in a row)", self._host_row)
            return True
        self._host_row = 0
        return False

    def before_update(self) -> None:
        """At the accumulation boundary, before the optimizer step: publish the step's loss flag."""
        if self.on_device:
            bad = self.bad.float()
            if self.world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # a device collective: no host read
            self.found_inf.copy_(bad)

    def after_update(self) -> None:
        """After the optimizer step: count it if it was skipped (loss or, via the clipping, gradients)."""
        if self.on_device:
            skipped = (self.found_inf > 0).to(torch.int64)
            self.total += skipped
            self.row.mul_(skipped).add_(skipped)
            torch.maximum(self.longest, self.row, out=self.longest)
            self.bad.zero_()

    def counters(self) -> dict:
        """Device scalars to read with the metrics (``Meter.report`` sums them over ranks)."""
        if not self.on_device:
            return {}
        return {"nonfinite_total": self.total, "nonfinite_row": self.longest}

    def read(self, metrics: dict) -> tuple[int, int]:
        """(total, longest row since the last read) from a metrics record, or from the host path.
        Every rank holds the same counts (the flag is all-reduced), so the sum over ranks is divided."""
        if not self.on_device:
            metrics["nonfinite_total"] = self._host_total
            return self._host_total, self._host_row
        total = int(round(metrics.pop("nonfinite_total") / self.world))
        row = int(round(metrics.pop("nonfinite_row") / self.world))
        metrics["nonfinite_total"] = total
        self.longest.copy_(self.row)
        return total, row

    def total_now(self) -> int:
        """The total, read now (at checkpoint time)."""
        return int(self.total.item()) if self.on_device else self._host_total


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def deepspeed_launcher() -> tuple[int, int] | None:
    """(pid of DeepSpeed's per-node launcher, pid of its parent: the ``deepspeed``
    command) when this process was started by it (Linux), else None."""
    try:
        pid = os.getppid()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"deepspeed.launcher.launch" not in f.read():
                return None
        return pid, _parent_of(pid)
    except (OSError, ValueError, IndexError):
        return None


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the step.

    ``agreed(due)`` tells, at every step boundary, whether any rank was asked
    to stop and whether any rank's clock says a checkpoint is due: one
    host-side all-reduce of two CPU integers on a gloo group (the default
    group on CPU runs, an extra one next to NCCL), so the device is never
    read for it, and ranks whose clocks differ still agree.

    A ``deepspeed`` command killed on its own (``kill PID``) does not pass the
    signal on: its per-node launcher and the ranks would train on as orphans.
    A rank started by that launcher therefore also stops when the launcher's
    parent is gone (one read of /proc per step)."""

    def __init__(self, world: int):
        self.requested = False
        self.world = world
        self.group = None
        if world > 1:
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.launcher = deepspeed_launcher()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _launcher_orphaned(self) -> bool:
        if self.launcher is None:
            return False
        pid, parent = self.launcher
        try:
            gone = _parent_of(pid) != parent
        except (OSError, ValueError, IndexError):
            gone = True
        if gone:
            log.warning("the deepspeed command that started this run is gone: stopping with a checkpoint")
            self.launcher = None
        return gone

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once; repeated SIGTERMs
            signal.signal(signum, signal.SIG_DFL)  # (launchers forward them) are absorbed

    def agreed(self, due: bool = False) -> tuple[bool, bool]:
        """(stop, checkpoint due) as every rank sees them; ``due``: this rank's clock."""
        if self._launcher_orphaned():
            self.requested = True
        if self.world == 1:
            return self.requested, due
        flags = torch.tensor([int(self.requested), int(due)])  # a CPU tensor: never a device read
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop, due = flags.tolist()
        return bool(stop), bool(due)
