"""What a user sees: metric lines (JSON lines + TensorBoard), FLOPs and MFU."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("cimfast")


# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A6000", 155.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (then no MFU is reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    log.warning("unknown GPU %r: pass --peak_tflops to report MFU", name)
    return None


def count_step_flops(make_model: Callable[[], torch.nn.Module], batch: dict) -> dict:
    """FLOPs of one training step per image, by part: the frozen tokenizer
    (encode + decode, forward only) and the trainable networks (forward and
    backward), counted with torch's FLOP counter on a batch of one.

    Everything runs on the ``meta`` device: ``make_model()`` is called under
    it, the batch is moved to it, so nothing is computed and nothing meets a
    tensor of the training device (a ViT-L step is counted in a second)."""
    with torch.device("meta"):
        model = make_model()
    one = {k: v[:1].to("meta") for k, v in batch.items()}
    tok = model.tokenizer
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ids = tok.tokenize(one["images_tok"].float())  # meta: only shapes and dtypes count
        tok.decode(ids)
    tokenizer = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = model(one["images"], one["images_tok"], one["mask"], one["sample_key"])
        out["loss"].backward()
    total = fc.get_total_flops()  # includes the tokenizer's forward once more
    return {"tokenizer": tokenizer, "trainable": total - tokenizer, "total": total}


class Meter:
    """Accumulates a run's scalar metrics on the device between log intervals
    and turns them into one metrics record with a single host read (the
    logging sync): averaged over micro-steps and ranks, with throughput, MFU
    and data-wait beside them."""

    def __init__(self, world: int, global_batch: int, flops_per_image: float, peak: Optional[float], step: int):
        self.world, self.global_batch = world, global_batch
        self.flops_per_image, self.peak = flops_per_image, peak
        self._reset(step)

    def _reset(self, step: int) -> None:
        self.keys: Optional[list] = None  # the scalar outputs, in a fixed order
        self.sums = self.counts = None    # [len(keys)] device vectors
        self.wait, self.since, self.step_at = 0.0, time.perf_counter(), step

    def add(self, out: dict) -> None:
        """One micro-step's outputs (scalar tensors): a few vector ops on the
        device, no host read. Non-finite values (a skipped step's) are left out
        of the means, not turned into NaN."""
        if self.keys is None:
            self.keys = sorted(k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 0)
        v = torch.stack([out[k].detach().float() for k in self.keys])
        ok = torch.isfinite(v)
        v = torch.where(ok, v, 0.0)
        self.sums = v if self.sums is None else self.sums + v
        self.counts = ok.float() if self.counts is None else self.counts + ok

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def report(self, step: int, counters: dict[str, torch.Tensor]) -> dict:
        """The record of the steps since the last report. ``counters`` (device
        scalars, e.g. non-finite counts) are read in the same host read; like
        the means they are reduced over ranks (the sum for counters)."""
        keys = self.keys or []
        means = self.sums / self.counts.clamp_min(1) / self.world if keys else None
        extra = torch.stack([counters[k].float() for k in sorted(counters)]) if counters else None
        parts = [t for t in (means, extra) if t is not None]
        vec = torch.cat(parts) if parts else torch.zeros(0)
        if self.world > 1:
            dist.all_reduce(vec)
        values = vec.tolist()  # the logging sync
        metrics = dict(zip(keys + sorted(counters), values))
        secs = time.perf_counter() - self.since
        steps = max(1, step - self.step_at)
        ips = steps * self.global_batch / secs
        metrics.update(img_per_s=ips, img_per_s_per_device=ips / self.world, data_wait=self.wait / secs,
                       step_time=secs / steps)
        if self.peak and self.flops_per_image:
            metrics["mfu"] = ips / self.world * self.flops_per_image / self.peak
        self._reset(step)
        return metrics


def progress_postfix(metrics: dict) -> dict:
    """The progress bar's short form of a metrics record."""
    post = {k: f"{metrics[k]:.4g}" for k in ("loss", "gen_loss", "enh_loss", "mse") if k in metrics}
    post["img/s"] = f"{metrics['img_per_s']:.1f}"
    if "mfu" in metrics:
        post["mfu"] = f"{metrics['mfu']:.1%}"
    return post


def tensorboard_name(key: str) -> str:
    """TensorBoard groups a series by the part of its name before "/": each loss
    beside its trivial baseline, the k-NN monitor beside its step-0 value."""
    if key.startswith("knn_"):
        return "knn/" + key[len("knn_"):]
    if "loss" in key or key == "gen_gap":
        return "loss/" + key
    if key.startswith("det_") or key in ("gen_acc", "replaced_frac"):
        return "accuracy/" + key
    return "run/" + key


class MetricsWriter:
    """JSON lines (``metrics.jsonl``) and TensorBoard events, rank 0 only."""

    def __init__(self, output_dir: str, resume_step: int = 0):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.isfile(self.path):  # drop lines past the resumed step: they will be redone
            with open(self.path) as f:
                lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(tensorboard_name(k), v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def closing_summary(records: list[dict]) -> str:
    """The last evaluation's top-1 values, each beside its gain over the run's step 0,
    for the run's closing line ('' when no record carries a gain)."""
    last = next((r for r in reversed(records) if any(k.endswith("_gain") for k in r)), None)
    if last is None:
        return ""
    return ", ".join(f"{k[:-5]} {last[k[:-5]]:.1f} ({last[k]:+.1f} over step 0)" for k in last
                     if k.endswith("_gain") and "top1" in k and k[:-5] in last)
