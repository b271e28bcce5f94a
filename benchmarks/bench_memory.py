"""Peak memory of one training step against batch size, with and without
activation checkpointing (the enhancer's blocks), for the given presets.

    python benchmarks/bench_memory.py --presets base large --batches 32 64 128 --out results/

CUDA only for real numbers (torch.cuda.max_memory_allocated, bf16 autocast,
fused AdamW); on a CPU it runs the tiny preset once as a smoke test and
reports no memory. A batch that does not fit is reported as OOM.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from cimfast.config.settings import Config
from cimfast.objective.cim import CIMModel
from cimfast.tokenizer.model import DALLE_SPEC, TINY_SPEC, Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import synthetic_batch  # noqa: E402


def step_peak(preset: str, batch: int, ckpt: bool, device) -> float | None:
    cfg = Config(preset=preset, grad_checkpointing=ckpt).resolve()
    tok = Tokenizer(DALLE_SPEC if cfg.tokenizer == "dalle" else TINY_SPEC).to(device)
    if device.type == "cuda":
        tok.fast(torch.bfloat16)
    model = CIMModel(cfg, tok).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    b = synthetic_batch(cfg, batch, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step holds the optimizer state too
        with amp:
            out = model(b["images"], b["images_tok"], b["mask"], b["sample_key"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["base", "large"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        a.presets, a.batches = ["tiny"], [2]
    rows = []
    print(f"{'preset':>8} {'batch':>6} {'checkpointing':>14} {'peak GiB':>9}")
    for preset in a.presets:
        for batch in a.batches:
            for ckpt in (False, True):
                try:
                    peak = step_peak(preset, batch, ckpt, device)
                    shown = f"{peak:9.1f}" if peak is not None else "      n/a"
                except torch.OutOfMemoryError:
                    peak, shown = "OOM", "      OOM"
                rows.append({"preset": preset, "batch": batch, "checkpointing": ckpt, "peak_gib": peak})
                print(f"{preset:>8} {batch:>6} {str(ckpt):>14} {shown}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "memory.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
