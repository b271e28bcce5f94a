"""Host syncs per training step: counts every device-to-host read and device
synchronize the training step makes, between log intervals.

    python benchmarks/sync_count.py --ds_config configs/ds_demo.json --bf16 --steps 6
    python benchmarks/sync_count.py ... --legacy   # DeepSpeed's defaults: throughput timer, bf16 overflow check

On the CPU the reads are counted where Python makes them: ``Tensor.item``,
``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``cpu``, ``numpy``,
and ``torch.cuda.synchronize`` / DeepSpeed's accelerator ``synchronize``;
each is counted with the line that called it. On a GPU, ``--cuda_sync_mode
warn`` makes PyTorch itself warn at every synchronizing CUDA call inside the
step (``torch.cuda.set_sync_debug_mode``), which also sees reads made inside
C++ (a boolean mask index, ``nonzero``); those warnings are counted too
(``error`` raises at the first one). Note: DeepSpeed ZeRO-1/2 with
``"overlap_comm": true`` synchronizes the device in every backward on CUDA
(not on the CPU), by its design for overlapping the gradient reduction.

Prints one JSON object: syncs per step (after ``--skip`` warm-up steps) and
where they came from.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
import warnings

import torch

from cimfast import train
from cimfast.engine import loop

METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class SyncCounter:
    def __init__(self):
        self.active = False
        self.local = threading.local()  # .inside: within a counted call, what it calls is the same sync
        self.cuda_warns = False  # PyTorch's warnings count the CUDA syncs: Tensor reads of CUDA tensors are left to them
        self.where = collections.Counter()
        self.count = 0

    def record(self, what: str) -> None:
        if not self.active:
            return
        self.count += 1
        frame = traceback.extract_stack(limit=4)[0]
        self.where[f"{what} at {os.path.relpath(frame.filename)}:{frame.lineno}"] += 1

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            # one sync is counted once: DeepSpeed's accelerator.synchronize calls torch.cuda.synchronize
            # (an H200 run counted both, at the same place), and with --cuda_sync_mode PyTorch's own
            # warning already counts a read of a CUDA tensor
            if getattr(self.local, "inside", False) or (
                    self.cuda_warns and args and isinstance(args[0], torch.Tensor) and args[0].is_cuda):
                return original(*args, **kwargs)
            self.record(label)
            self.local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self.local.inside = False

        setattr(owner, name, wrapped)

    def install(self) -> None:
        for m in METHODS:
            self.wrap(torch.Tensor, m, f"Tensor.{m}")
        self.wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        self.wrap(acc, "synchronize", "accelerator.synchronize")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ds_config", default="configs/ds_demo.json")
    p.add_argument("--bf16", action="store_true", help="a bf16 engine (the GPU recipes' setting)")
    p.add_argument("--legacy", action="store_true",
                   help="DeepSpeed's own defaults: throughput timer on, bf16 overflow check on")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps not counted")
    p.add_argument("--cuda_sync_mode", default=None, choices=[None, "warn", "error"])
    p.add_argument("--out", default=None)
    a, rest = p.parse_known_args(argv)

    with open(a.ds_config) as f:
        ds = json.load(f)
    ds.setdefault("cimfast", {}).update(max_steps=a.steps, log_interval=a.steps, checkpoint_interval=0,
                                        image_interval=0, progress=False)
    for k in ("knn_train_path", "knn_val_path"):  # the step loop only: no k-NN monitor
        ds["cimfast"].pop(k, None)
    ds["bf16"] = {"enabled": bool(a.bf16)}
    if a.legacy:
        ds["timers"] = {"throughput": {"enabled": True}}
        if a.bf16:
            ds["bf16"]["check_grad_overflow"] = True
    tmp = tempfile.mkdtemp(prefix="cimfast-syncs-")
    cfg_path = os.path.join(tmp, "ds.json")
    with open(cfg_path, "w") as f:
        json.dump(ds, f)

    counter = SyncCounter()
    counter.install()
    counter.cuda_warns = bool(a.cuda_sync_mode)
    per_step = []
    original_step = loop.train_step

    def counted_step(*args, **kwargs):
        counter.count = 0
        counter.active = len(per_step) >= a.skip
        if counter.active and a.cuda_sync_mode:
            torch.cuda.set_sync_debug_mode(a.cuda_sync_mode)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return original_step(*args, **kwargs)
        finally:
            if a.cuda_sync_mode:
                torch.cuda.set_sync_debug_mode("default")
            for w in caught if counter.active else ():  # "warn": each synchronizing CUDA call warns
                if "synchroniz" in str(w.message):
                    counter.count += 1
                    counter.where[f"CUDA sync at {os.path.relpath(w.filename)}:{w.lineno}"] += 1
            per_step.append(counter.count if counter.active else None)
            counter.active = False

    loop.train_step = counted_step
    try:
        code = train.main(["--ds_config", cfg_path, "--output_dir", os.path.join(tmp, "out"), *rest])
    finally:  # the run's checkpoints are not the result: leave nothing in the temporary folder
        loop.train_step = original_step
        shutil.rmtree(tmp, ignore_errors=True)
    counted = [c for c in per_step if c is not None]
    result = {"exit_code": code, "bf16": a.bf16, "legacy": a.legacy, "steps_counted": len(counted),
              "syncs_per_step": (sum(counted) / len(counted)) if counted else None,
              "max_syncs_in_a_step": max(counted, default=None), "where": dict(counter.where)}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
