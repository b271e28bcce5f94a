"""Every Triton kernel compiles for H100/H200 (sm_90a) and B200 (sm_100a) at the
launch configuration its wrapper picks on a GPU, without a GPU: no register
spills, shared memory under the per-block limit (benchmarks/kernel_resources.py;
the table is in benchmarks/RESULTS.md)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_resources.py")
KERNELS = {"sample_ce_fwd", "sample_ce_bwd", "window_norm_loss_fwd", "window_norm_loss_bwd"}


def _compile(tmp_path, *flags):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    out = tmp_path / "kernels.json"
    r = subprocess.run([sys.executable, SCRIPT, "--json", str(out), *flags], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    return r, json.loads(out.read_text()) if out.is_file() else []


def test_kernels_compile_for_sm90a_and_sm100a_without_spills(tmp_path):
    r, rows = _compile(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for target in ("sm_90a", "sm_100a"):
        mine = [x for x in rows if x["target"] == target]
        assert {x["kernel"] for x in mine} == KERNELS
        assert len(mine) == 2 * 2 * (2 * 2 * 2 + 2 * 2)  # presets x batches x (V x dtype x fwd/bwd + dtype x fwd/bwd)
        for x in mine:
            assert x["spill_stores"] == 0 and x["spill_loads"] == 0, x
            assert 0 < x["registers"] <= 255 and x["smem_total"] <= 227 * 1024, x
    # the DALL-E vocabulary row is held in registers by one program per row
    big = [x for x in rows if x["kernel"] == "sample_ce_fwd" and "V=8192" in x["shape"]]
    assert all(x["launch"]["BLOCK_V"] == 8192 and x["launch"]["ROWS"] == 1 for x in big)


def test_the_check_sees_spills(tmp_path):
    """The interpreter's wide launch shape (16 rows x 1024 columns per program) spills when compiled."""
    r, rows = _compile(tmp_path, "--interpreter_launch")
    assert r.returncode == 1
    assert any(x["spill_stores"] > 0 for x in rows if x["kernel"] == "sample_ce_fwd")
