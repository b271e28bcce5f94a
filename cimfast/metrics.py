"""What a user sees: metric lines (JSON lines + TensorBoard), FLOPs and MFU."""
from __future__ import annotations

import json
import logging
import os

import torch

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


def count_step_flops(model, batch: dict) -> dict:
    """FLOPs of one training step per image, by part: the frozen tokenizer
    (encode + decode, forward only) and the trainable networks (forward and
    backward), counted with torch's FLOP counter on a batch of one."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    tok = model.tokenizer
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ids = tok.tokenize(one["images_tok"])
        tok.decode(ids)
    tokenizer = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out = model(one["images"], one["images_tok"], one["mask"], one["sample_key"])
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    total = fc.get_total_flops()  # includes the tokenizer's forward once more
    return {"tokenizer": tokenizer, "trainable": total - tokenizer, "total": total}


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
                    self.tb.add_scalar(k, v, step)

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
