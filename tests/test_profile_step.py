"""benchmarks/profile_step.py on the CPU: every phase of the real step timed,
their sum beside the measured step, FLOPs where the work is, and the phased
forward equal to the engine's."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ["data", "tokenize", "generator", "sample_ce", "decode", "enhancer", "loss", "backward", "optimizer"]


def test_profile_step_times_every_phase_beside_the_whole_step(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--preset", "tiny",
                        "--micro_batch", "4", "--steps", "1", "--warmup", "1", "--profiler_steps", "1",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in PHASES + ["phase sum", "whole step", "graph breaks", "profiler"]:
        assert name in r.stdout, name
    rep = json.loads(out.read_text())
    assert list(rep["phases"]) == PHASES
    assert all(p["ms"] > 0 for p in rep["phases"].values())
    assert abs(rep["phase_sum_ms"] - sum(p["ms"] for p in rep["phases"].values())) < 1e-6
    assert rep["step_ms"] > 0 and rep["micro_batch"] == 4 and rep["sum_over_step"] > 0
    gflop = {k: p["gflop"] for k, p in rep["phases"].items()}
    assert min(gflop[k] for k in ("tokenize", "generator", "decode", "enhancer")) > 0
    assert gflop["backward"] > gflop["generator"] + gflop["enhancer"]  # about twice the trained forward
    assert rep["phased_loss_equals_forward"]["abs_diff"] < 1e-5
    kernels = rep["kernels"]
    assert kernels["busy_ms"] > 0 and {"convolution", "matmul"} <= set(kernels["by_category_ms"])
    assert rep["dynamo"]["graph_breaks"] == 0 and rep["recompiles_while_timed"] == 0
