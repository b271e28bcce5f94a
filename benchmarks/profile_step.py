"""Where a CIM training step's time goes: every phase timed on its own, beside
the whole step through the real engine.

    python benchmarks/profile_step.py --preset tiny                 # CPU, the demo data
    python benchmarks/profile_step.py --preset base --tokenizer_path T --pipeline synthetic --out p.json

The model, engine and data come from ``cimfast/train.py``'s own set-up (the
same ``Job``, DeepSpeed engine and modules a training run builds; any
training flag is passed through). Then:

- the whole step: ``train_step`` of the training loop, as a run calls it;
- each phase on its own, as its own region (compiled on its own when the
  run compiles): the batch, tokenizer encode, generator forward, sampling
  and cross-entropy, decode, enhancer forward, loss, backward, optimizer
  step. They are the very methods ``CIMModel.forward`` calls, and the
  phased step's loss is checked equal to the engine's on the same batch;
- FLOPs per phase (torch's FLOP counter, once, eagerly) and achieved TFLOP/s;
- graph breaks and recompiles of the compiled step (dynamo's counters);
- a few steps of ``torch.profiler``: kernel time by category, and how much
  of the step the device is busy.

CUDA events time the phases on CUDA, the wall clock on the CPU. One table on
stdout, one JSON object with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cimfast import train
from cimfast.config.cli import default_ds_config, parse
from cimfast.engine.distributed import fill_auto, finish, init_distributed
from cimfast.engine.guards import NonFiniteGuard
from cimfast.engine.loop import make_engine, train_step
from cimfast.engine.metrics import Meter, peak_flops
from cimfast.objective.cim import build_tokenizer
from cimfast.pipelines.prefetch import DevicePrefetcher
from cimfast.pipelines.views import as_unit

PRESET_CONFIGS = {"tiny": "ds_demo.json", "tiny-resnet": "ds_demo.json", "small": "ds_demo.json",
                  "base": "ds_vit_base.json", "large": "ds_vit_large.json", "resnet50": "ds_resnet50.json"}
PHASES = ("data", "tokenize", "generator", "sample_ce", "decode", "enhancer", "loss", "backward", "optimizer")
# kernel (or CPU op) names -> category, first match wins
CATEGORIES = (("attention", r"flash|fmha|attention|sdpa|cutlass.*mha|xformers"),
              ("triton (cimfast)", r"_sample_ce|_window_norm|cimfast"),
              ("triton (inductor)", r"^triton_|triton"),
              ("convolution", r"conv|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd|mkldnn_conv"),
              ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|linear|xmma|sm90_|cublas|mm_"),
              ("optimizer", r"adam|foreach|multi_tensor|fused_adam"),
              ("copy / fill", r"copy|memcpy|memset|fill|cat\b|_to_copy|contiguous"),
              ("reduction / norm", r"reduce|norm|sum|mean|softmax|max|argmax|cumsum"),
              ("elementwise", r"elementwise|vectorized|unrolled|add|mul|relu|gelu|sigmoid|where|div|sub"))


class Clock:
    """Times regions with CUDA events on CUDA, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes once, on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            out = [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Phases:
    """The step's phases, each a callable of its own (compiled on its own when asked)."""

    def __init__(self, engine, compile_: bool):
        m = engine.module
        self.engine, self.model = engine, m
        wrap = (lambda f: torch.compile(f, dynamic=False)) if compile_ else (lambda f: f)
        self.fns = {"tokenize": wrap(m.tokenize), "generator": wrap(m.generate), "sample_ce": wrap(m.sample),
                    "decode": wrap(m.corrupt), "enhancer": wrap(m.enhance), "loss": wrap(self._loss)}

    def _loss(self, gen, out, images, ids, pos, mask):
        enh_loss, diagnostics = self.model.enhancer_loss(out, images, gen.replaced)
        return self.model.combine(gen, enh_loss, diagnostics, ids, pos, mask)

    def forward(self, b: dict, phase) -> dict:
        """The step's forward from a batch, phase by phase: ``phase(name, fn, *args)`` calls each."""
        m, f = self.model, self.fns
        images, images_tok = as_unit(b["images"]), as_unit(b["images_tok"])
        mask, keys = b["mask"].bool(), b["sample_key"]
        ids = phase("tokenize", f["tokenize"], images_tok)
        pos = m.masked_positions(mask)
        logits = phase("generator", f["generator"], images, mask, pos)
        gen = phase("sample_ce", f["sample_ce"], logits, ids, mask, keys, pos)
        corrupted = phase("decode", f["decode"], gen.corrupted, images.shape[-2:])
        out = phase("enhancer", f["enhancer"], corrupted)
        return phase("loss", f["loss"], gen, out, images, ids, pos, mask)

    def run(self, batch_fn, mark, guard, flops: dict | None = None) -> torch.Tensor:
        """One phased step; ``mark()`` between phases. With ``flops``, each phase's
        FLOPs are counted into it (eager only). Returns the loss (detached)."""

        def phase(name, fn, *args):
            if flops is None:
                out = fn(*args)
            else:
                with FlopCounterMode(display=False) as fc:
                    out = fn(*args)
                flops[name] = fc.get_total_flops()
            mark()
            return out

        mark()
        result = self.forward(phase("data", batch_fn), phase)
        phase("backward", self.engine.backward, result["loss"])
        guard.before_update()
        phase("optimizer", self.engine.step)
        guard.after_update()
        return result["loss"].detach()


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def profile_kernels(step_fn, steps: int, device: torch.device) -> dict:
    """Kernel time by category over ``steps`` whole steps, and the device's busy share."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step_fn()
        sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    by_cat: dict[str, float] = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        else:
            us = ev.self_cpu_time_total if ev.key.startswith("aten::") else 0  # aten ops: no double counting
        if us > 0:
            cat = categorize(ev.key)
            by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3
    busy = sum(by_cat.values())
    return {"steps": steps, "wall_ms": wall_ms, "busy_ms": busy, "busy_frac": busy / wall_ms if wall_ms else None,
            "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "what": "CUDA kernel time" if device.type == "cuda" else "self CPU time of aten ops"}


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"graph_breaks": sum(breaks.values()), "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "break_reasons": {k.split("\n")[0][:160]: v for k, v in breaks.items()}}


def build_args(a, rest, out_dir) -> list[str]:
    ds_path = a.ds_config or default_ds_config(PRESET_CONFIGS.get(a.preset, "ds_demo.json"))
    with open(ds_path) as f:
        ds = json.load(f)
    sec = ds.setdefault("cimfast", {})
    total = a.warmup + a.steps + a.profiler_steps + 2
    sec.update(preset=a.preset, max_steps=max(total, 10), log_interval=10**6, checkpoint_interval=0,
               image_interval=0, progress=False)
    for k in ("knn_train_path", "knn_val_path"):  # the step only: no k-NN monitor
        sec.pop(k, None)
    if "synthetic" in rest and "--data_path" not in rest:  # compute only: the config's data is never read
        sec["data_path"] = None
    # one rank, no accumulation: every timed step is one micro-batch and one optimizer step
    micro = a.micro_batch or ds.get("train_micro_batch_size_per_gpu") or ds["train_batch_size"]
    ds.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro, gradient_accumulation_steps=1)
    path = os.path.join(out_dir, "ds.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    return ["--ds_config", path, "--output_dir", os.path.join(out_dir, "run"), *rest]


def table(report: dict) -> str:
    lines = [f"{'phase':<12}{'ms':>10}{'share':>8}{'GFLOP':>10}{'TFLOP/s':>10}"]
    total = report["phase_sum_ms"]
    for name, r in report["phases"].items():
        tf = f"{r['tflops']:.2f}" if r["tflops"] is not None else "-"
        lines.append(f"{name:<12}{r['ms']:>10.2f}{r['ms'] / total:>8.1%}{r['gflop']:>10.2f}{tf:>10}")
    lines.append(f"{'phase sum':<12}{total:>10.2f}")
    lines.append(f"{'whole step':<12}{report['step_ms']:>10.2f}   (sum / step = {report['sum_over_step']:.2f}; "
                 f"{report['img_per_s']:.1f} img/s at micro-batch {report['micro_batch']})")
    d = report["dynamo"]
    lines.append(f"compile: {report['compile']}; graph breaks {d['graph_breaks']}, graphs {d['unique_graphs']}, "
                 f"recompiles while timed {report['recompiles_while_timed']}")
    k = report["kernels"]
    lines.append(f"profiler ({k['what']}, {k['steps']} steps): busy {k['busy_ms']:.1f} of {k['wall_ms']:.1f} ms "
                 f"({k['busy_frac']:.0%})")
    for cat, ms in k["by_category_ms"].items():
        lines.append(f"  {cat:<20}{ms:>10.2f} ms {ms / max(k['busy_ms'], 1e-9):>7.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other flags go to the trainer (e.g. --compile, --tokenizer_path).")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESET_CONFIGS))
    p.add_argument("--ds_config", default=None, help="default: the preset's shipped config")
    p.add_argument("--micro_batch", type=int, default=None,
                   help="micro-batch (default: the config's); one rank, no gradient accumulation")
    p.add_argument("--steps", type=int, default=5, help="timed steps, for the whole step and for the phases")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles happen here)")
    p.add_argument("--profiler_steps", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a, rest = p.parse_known_args(argv)
    if min(a.steps, a.profiler_steps) < 1 or a.warmup < 0:
        p.error("--steps and --profiler_steps must be at least 1, --warmup at least 0")

    tmp = tempfile.mkdtemp(prefix="cimfast-profile-")
    try:
        cfg, run, ds_cfg, ds_path = parse(build_args(a, rest, tmp))
        fill_auto(ds_cfg, run)
        tokenizer = build_tokenizer(cfg)
        place = init_distributed()
        job = train.setup(cfg, run, ds_cfg, ds_path, tokenizer, place)
        engine = make_engine(job.model, ds_cfg, run, job.param_groups)
        report = measure(a, job, engine, run, place.world, place.device)
        finish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def measure(a, job, engine, run, world: int, device: torch.device) -> dict:
    micro = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    batches = DevicePrefetcher(job.batches(micro, 0), device)
    guard = NonFiniteGuard(engine.optimizer, device, world, 0, run.max_nonfinite)
    meter = Meter(world, micro * gas * world, job.flops_per_image, None, 0)
    state = {"micro_steps_consumed": 0}
    engine.train()

    def whole_step():
        train_step(engine, job, batches, guard, meter, state, 0)

    # the whole step through the engine, as the training loop runs it
    for _ in range(a.warmup):
        whole_step()
    graphs_before = dynamo_counts()["unique_graphs"]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        whole_step()
    sync(device)
    step_ms = 1e3 * (time.perf_counter() - t0) / a.steps / gas
    recompiles = dynamo_counts()["unique_graphs"] - graphs_before
    dynamo = dynamo_counts()
    kernels = profile_kernels(whole_step, a.profiler_steps, device)

    # the same step, phase by phase (each phase its own compiled region with --compile)
    phases = Phases(engine, bool(run.compile))
    clock = Clock(device)
    flops: dict = {}
    eager = Phases(engine, False)
    eager.run(lambda: next(batches), clock.mark, guard, flops)  # FLOPs, counted once in eager mode
    clock.intervals_ms()
    check = check_phases_equal_forward(engine, phases, batches)
    for _ in range(a.warmup):
        phases.run(lambda: next(batches), clock.mark, guard)
        clock.intervals_ms()
    totals = [0.0] * len(PHASES)
    for _ in range(a.steps):
        phases.run(lambda: next(batches), clock.mark, guard)
        for i, ms in enumerate(clock.intervals_ms()):
            totals[i] += ms / a.steps
    rows = {}
    for name, ms in zip(PHASES, totals):
        fl = flops.get(name, 0) / micro
        rows[name] = {"ms": ms, "gflop": fl / 1e9, "tflops": fl * micro / (ms * 1e9) if ms > 0 and fl else None}
    phase_sum = sum(totals)
    peak = peak_flops(device, run.peak_tflops)
    step_flops = sum(flops.get(n, 0) for n in PHASES)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "preset": job.model.cfg.preset, "micro_batch": micro, "compile": bool(run.compile),
            "tokenizer_bf16": bool(run.tokenizer_bf16), "phases": rows, "phase_sum_ms": phase_sum,
            "step_ms": step_ms, "sum_over_step": phase_sum / step_ms, "img_per_s": micro / step_ms * 1e3,
            "gflop_per_image": step_flops / micro / 1e9,
            "mfu": (step_flops / (step_ms / 1e3) / peak) if peak else None,
            "dynamo": dynamo, "recompiles_while_timed": recompiles, "kernels": kernels,
            "phased_loss_equals_forward": check}


def check_phases_equal_forward(engine, phases: Phases, batches) -> dict:
    """The phased forward and the engine's own forward give the same loss on one batch."""
    b = next(batches)
    with torch.no_grad():
        whole = engine.module.forward(b["images"], b["images_tok"], b["mask"], b["sample_key"])["loss"]
        phased = phases.forward(b, lambda name, fn, *args: fn(*args))["loss"]
    diff = float((whole.float() - phased.float()).abs())
    return {"forward_loss": float(whole), "phased_loss": float(phased), "abs_diff": diff}


if __name__ == "__main__":
    sys.exit(main())
