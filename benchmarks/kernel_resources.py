"""Compile every Triton kernel of cimfast for real NVIDIA GPUs, without a GPU.

    python benchmarks/kernel_resources.py              # table for sm_90a (H100/H200) and sm_100a (B200)
    python benchmarks/kernel_resources.py --json out.json

Each kernel is compiled at the launch configuration its wrapper picks on a
GPU (not the interpreter's) for realistic shapes: the ViT-B and ViT-L
presets at batch 64 and 256, vocabularies of 8192 (DALL-E) and 512 (tiny),
fp32 and bf16 logits or predictions, ResPix window 9. Triton compiles for a
named target with the ``ptxas`` its wheel ships; only the driver's queries
(current device, stream, target) need a stand-in. ``ptxas -v`` then reports
registers per thread, spill bytes and static shared memory; Triton's
metadata gives the dynamic shared memory.

Must run with Triton's interpreter off (``TRITON_INTERPRET`` unset): under
the interpreter ``@triton.jit`` makes interpreted functions, which do not
compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_resources.py: unset TRITON_INTERPRET (compiled kernels cannot be made under the interpreter)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from cimfast.kernels import pixel_loss, sampling  # noqa: E402

TARGETS = {"sm_90a": 90, "sm_100a": 100}
SHARED_LIMIT = 227 * 1024  # bytes per block (opt-in maximum) on H100/H200 and B200
PRESETS = {"base": 75, "large": 75}  # masked patches per image (14 x 14 grid, BEiT's 75)
BATCHES = (64, 256)


class TargetOnly:
    """A stand-in for the CUDA driver that answers only what compilation asks."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def cases(interpreter_launch: bool = False):
    """(kernel name, JIT function, args, constexprs and launch options, shape description).
    ``interpreter_launch``: the launch shapes picked for Triton's CPU interpreter instead
    (wide programs; they spill when compiled, which shows that the check sees spills)."""
    il = interpreter_launch
    out = []
    for preset, masked in PRESETS.items():
        for batch in BATCHES:
            M = batch * masked
            for V in (8192, 512):
                for dtype in (torch.float32, torch.bfloat16):
                    rows, block_v, warps = sampling._launch_config(V, 0, 0, interpreter=il)
                    desc = f"{preset} B={batch} M={M} V={V} {str(dtype).split('.')[-1]}"
                    out.append(("sample_ce_fwd", sampling._sample_ce_fwd_kernel,
                                (dtype, V, torch.int64, torch.int64, torch.int64, torch.float32, torch.int64,
                                 torch.float32, torch.int8, dtype, M, V, 1.0),
                                dict(ROWS=rows, BLOCK_V=block_v, COMPUTE_GRAD=True, num_warps=warps), desc))
                    rows, block, warps = sampling._backward_launch_config(V, interpreter=il)
                    out.append(("sample_ce_bwd", sampling._scale_rows_kernel,
                                (dtype, torch.float32, dtype, M, V),
                                dict(ROWS=rows, BLOCK_V=block, num_warps=warps), desc))
            for dtype in (torch.float32, torch.bfloat16):
                block, warps = pixel_loss._launch_config(0, interpreter=il)
                numel = batch * 3 * 224 * 224
                desc = f"{preset} B={batch} 224px window 9 {str(dtype).split('.')[-1]}"
                kw = dict(WINDOW=9, PATCH=16, BLOCK=block, num_warps=warps)
                out.append(("window_norm_loss_fwd", pixel_loss._window_norm_loss_fwd_kernel,
                            (dtype, torch.float32, torch.float32, numel, 3, 224, 224, 1e-4), kw, desc))
                out.append(("window_norm_loss_bwd", pixel_loss._window_norm_loss_bwd_kernel,
                            (torch.float32, dtype, torch.float32, dtype, numel, 3, 224, 224, 1e-4,
                             2.0 / numel), kw, desc))
    return out


def ptxas_report(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    text = r.stderr + r.stdout

    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "static_smem": num(r"(\d+) bytes smem")}


def measure(interpreter_launch: bool = False) -> list[dict]:
    rows, seen = [], {}
    previous = driver._active  # reset_active() would look for a real driver, which a CPU machine lacks
    for target, arch in TARGETS.items():
        driver.set_active(TargetOnly(arch))
        for _, fn, _, _, _ in cases(interpreter_launch):  # the JIT caches kernels per device index, not target
            fn.device_caches.clear()
        try:
            for name, fn, args, kw, desc in cases(interpreter_launch):
                compiled = fn.warmup(*args, grid=(1,), **kw)
                key = (target, name, compiled.hash)
                if key not in seen:
                    seen[key] = ptxas_report(compiled.asm["ptx"], arch)
                rep = dict(seen[key])
                rep.update(target=target, kernel=name, shape=desc, num_warps=kw["num_warps"],
                           launch={k: v for k, v in kw.items() if k != "num_warps"},
                           dynamic_smem=int(compiled.metadata.shared))
                rep["smem_total"] = rep["dynamic_smem"] + rep["static_smem"]
                rows.append(rep)
        finally:
            driver._active = previous
    return rows


def table(rows: list[dict]) -> str:
    """One line per (target, kernel, launch configuration); the shapes that share it are counted."""
    groups = {}
    for r in rows:
        key = (r["target"], r["kernel"], r["shape"].split()[-1], json.dumps(r["launch"]), r["num_warps"],
               r["registers"], r["spill_stores"], r["spill_loads"], r["smem_total"])
        groups.setdefault(key, []).append(r["shape"])
    lines = ["| target | kernel | input dtype | launch | warps | registers | spill stores / loads (B) "
             "| shared memory (B) | shapes |", "|---|---|---|---|---|---|---|---|---|"]
    for (t, k, dt, launch, w, reg, ss, sl, smem), shapes in groups.items():
        lines.append(f"| {t} | {k} | {dt} | `{launch}` | {w} | {reg} | {ss} / {sl} | {smem} | {len(shapes)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--interpreter_launch", action="store_true",
                   help="compile the interpreter's launch shapes instead (a check that spills are seen)")
    a = p.parse_args(argv)
    rows = measure(a.interpreter_launch)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["smem_total"] > SHARED_LIMIT]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
