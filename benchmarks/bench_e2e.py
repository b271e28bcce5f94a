"""End-to-end CIM step throughput: the plain path against the fast path, in one run.

    python benchmarks/bench_e2e.py --preset tiny --batch 16 --steps 10
    python benchmarks/bench_e2e.py --preset base --batch 128 --steps 20 --out results/

plain: eager, reference ops (CIMFAST_KERNELS=reference), one-hot decoder
input, math attention, fp32 tokenizer, fp32 networks.
fast: compiled on CUDA (eager on a CPU), dispatched kernels, embedding-lookup
decoder, default attention backend, bf16 tokenizer and bf16 autocast on CUDA.

Synthetic batches live on the device (compute only, no data loading). For
each path: images/s, MFU over all FLOPs of the step (tokenizer, generator,
enhancer; on a known GPU), the time split between tokenizer, generator and
enhancer (each timed alone), and peak memory. The last line is the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from cimfast.config.settings import Config
from cimfast.engine.metrics import count_step_flops, peak_flops
from cimfast.models import attention
from cimfast.objective.cim import CIMModel, build_tokenizer
from cimfast.objective.masking import BlockMaskGenerator
from cimfast.tokenizer.model import DALLE_SPEC, Tokenizer


def synthetic_batch(cfg: Config, batch: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    masks = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block).batch(range(batch))
    return {"images": torch.rand(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(device),
            "images_tok": torch.rand(batch, 3, cfg.tok_size, cfg.tok_size, generator=g).to(device),
            "mask": torch.from_numpy(masks).to(device),
            "sample_key": torch.arange(batch, device=device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def build(cfg: Config, device, fast: bool):
    torch.manual_seed(0)
    # speed depends on the architecture only: the DALL-E presets get random weights
    tok = (Tokenizer(DALLE_SPEC) if cfg.tokenizer == "dalle" else build_tokenizer(cfg)).to(device)
    model = CIMModel(cfg, tok).to(device)
    if fast:
        if device.type == "cuda":
            tok.fast(torch.bfloat16, compile=True)
            model.generator = torch.compile(model.generator)
            model.enhancer = torch.compile(model.enhancer)
    else:
        tok.decode = tok.decode_onehot  # the official one-hot form
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, opt


def measure(cfg: Config, batch: int, device, fast: bool, steps: int, warmup: int) -> dict:
    os.environ["CIMFAST_KERNELS"] = "triton" if fast and device.type == "cuda" else "reference"
    attention.set_backend(None if fast else "math")
    model, opt = build(cfg, device, fast)
    b = synthetic_batch(cfg, batch, device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if fast and device.type == "cuda"
           else contextlib.nullcontext())

    def step():
        with amp:
            out = model(b["images"], b["images_tok"], b["mask"], b["sample_key"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    def tokenizer_only():
        ids = model.tokenizer.tokenize(b["images_tok"])
        model.tokenizer.decode(ids)

    x = model.normalize(b["images"])
    pos = torch.nonzero_static(b["mask"].reshape(-1), size=batch * cfg.num_masked).squeeze(1)

    def generator_only():
        with amp:
            model.generator(x, b["mask"], pos).float().logsumexp(-1).mean().backward()

    def enhancer_only():
        with amp:
            model.enhancer(x).float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_step = timed(step, device, steps, warmup)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    split = {name: timed(fn, device, max(1, steps // 2), 1)
             for name, fn in (("tokenizer", tokenizer_only), ("generator", generator_only),
                              ("enhancer", enhancer_only))}
    return {"path": "fast" if fast else "plain", "step_s": t_step, "img_per_s": batch / t_step,
            "split_s": split, "peak_mem_gb": mem}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--objective", default="respix")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="folder for the JSON result")
    a = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg = Config(preset=a.preset, objective=a.objective).resolve()
    spec = DALLE_SPEC if cfg.tokenizer == "dalle" else build_tokenizer(cfg).spec
    flops = count_step_flops(lambda: CIMModel(cfg, Tokenizer(spec)), synthetic_batch(cfg, 1, torch.device("cpu")))
    peak = peak_flops(device, None)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; preset {a.preset}, "
          f"batch {a.batch}; {flops['total'] / 1e9:.2f} GFLOP per image per step "
          f"(tokenizer {flops['tokenizer'] / 1e9:.2f})", flush=True)
    results = []
    for fast in (False, True):  # each line as soon as it is measured: a run cut short still says something
        r = measure(cfg, a.batch, device, fast, a.steps, a.warmup)
        if peak:
            r["mfu"] = r["img_per_s"] * flops["total"] / peak
        sp = r["split_s"]
        tot = sum(sp.values())
        print(f"{r['path']:>5}: {r['img_per_s']:9.1f} img/s  step {r['step_s'] * 1e3:8.1f} ms"
              + (f"  MFU {r['mfu']:.1%}" if peak else "")
              + (f"  peak {r['peak_mem_gb']:.1f} GiB" if r["peak_mem_gb"] is not None else "")
              + "  split " + ", ".join(f"{k} {v / tot:.0%}" for k, v in sp.items()), flush=True)
        results.append(r)
    ratio = results[1]["img_per_s"] / results[0]["img_per_s"]
    print(f"fast / plain: {ratio:.2f}x")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"e2e_{a.preset}.json"), "w") as f:
            json.dump({"preset": a.preset, "batch": a.batch, "flops": flops, "results": results, "ratio": ratio}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
