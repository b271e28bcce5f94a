"""The sync-free guards: the non-finite step skip on the device, its counters,
DeepSpeed's clipping without its host read, and the learning-rate schedule
the shipped configs ask for."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cimfast.guards import NonFiniteGuard, _unscale_and_clip_grads_on_device, device_skip_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_and_opt(fused=True):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    return m, torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.05, fused=fused)


def _step(m, opt, guard, x):
    loss = m(x).square().mean()
    guard.skip(loss)
    loss.backward()
    guard.before_update()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(m, opt):
    params = [p.detach().clone() for p in m.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()] if opt.state else []
    return params, state


def test_a_nonfinite_step_is_skipped_exactly_on_the_device():
    m, opt = _model_and_opt()
    guard = NonFiniteGuard(opt, torch.device("cpu"), world=1)
    assert guard.on_device and device_skip_optimizer(opt) is opt
    good = torch.randn(5, 4)
    _step(m, opt, guard, good)
    before_params, before_state = _snapshot(m, opt)
    _step(m, opt, guard, torch.full((5, 4), float("nan")))  # NaN loss and NaN gradients
    after_params, after_state = _snapshot(m, opt)
    for a, b in zip(before_params, after_params):
        assert torch.equal(a, b)  # weights untouched
    for a, b in zip(before_state, after_state):
        for k in a:
            assert torch.equal(a[k], b[k]), k  # moments and the step count untouched
    # a good step after it updates again, exactly as an optimizer that never saw the bad step
    _step(m, opt, guard, good)
    m2, opt2 = _model_and_opt()
    g2 = NonFiniteGuard(opt2, torch.device("cpu"), world=1)
    _step(m2, opt2, g2, good)
    _step(m2, opt2, g2, good)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_counters_count_steps_and_the_longest_row():
    m, opt = _model_and_opt()
    guard = NonFiniteGuard(opt, torch.device("cpu"), world=1, total=4)  # 4 from before a resume
    nan = torch.full((2, 4), float("nan"))
    for x in (nan, nan, torch.randn(2, 4), nan):
        _step(m, opt, guard, x)
    metrics = {k: float(v) for k, v in guard.counters().items()}
    total, row = guard.read(metrics)
    assert (total, row) == (7, 2) and metrics == {"nonfinite_total": 7}
    total, row = guard.read({k: float(v) for k, v in guard.counters().items()})
    assert (total, row) == (7, 1)  # the row still open carries over into the next interval
    assert guard.total_now() == 7


def test_optimizer_without_found_inf_takes_the_host_path():
    m, opt = _model_and_opt(fused=False)
    guard = NonFiniteGuard(opt, torch.device("cpu"), world=1)
    assert not guard.on_device
    assert guard.skip(torch.tensor(float("inf"))) and not guard.skip(torch.tensor(1.0))
    assert guard.read({}) == (1, 0)


class _ZeroLike:
    """The attributes DeepSpeed's ZeRO-1/2 clipping reads."""

    def __init__(self, clip_grad, loss_scale=1.0):
        self.clip_grad, self.loss_scale, self.device = clip_grad, loss_scale, torch.device("cpu")


@pytest.mark.parametrize("norm", [0.5, 7.0, float("nan"), float("inf")])
@pytest.mark.parametrize("clip", [0.0, 3.0])
def test_clipping_without_host_read_matches_deepspeed(norm, clip):
    stage = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    grads = torch.randn(10)
    ours, theirs = [grads.clone()], [grads.clone()]
    _unscale_and_clip_grads_on_device(_ZeroLike(clip), [ours], torch.tensor(norm))
    stage.DeepSpeedZeroOptimizer.unscale_and_clip_grads(_ZeroLike(clip), [theirs], torch.tensor(norm))
    assert torch.allclose(ours[0], theirs[0], equal_nan=True)


SCHEDULE = r"""
import json, sys, torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR
from cimfast.runtime import fill_auto
from cimfast.config import RunConfig
ds = json.load(open(sys.argv[1]))
ds.pop("cimfast", None)
fill_auto(ds, RunConfig(max_steps=1000))
p = ds["scheduler"]["params"]
opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=ds["optimizer"]["params"]["lr"])
s = WarmupCosineLR(opt, **p)
lrs = []
for _ in range(p["warmup_num_steps"] + 3):
    s.step()
    lrs.append(opt.param_groups[0]["lr"])
print(json.dumps({"lrs": lrs, "warmup": p["warmup_num_steps"], "peak": ds["optimizer"]["params"]["lr"],
                  "timers": ds["timers"]}))
"""


@pytest.mark.parametrize("name", ["ds_demo.json", "ds_vit_base.json", "ds_vit_large.json", "ds_resnet50.json",
                                  "ds_tokenizer_demo.json"])
def test_shipped_configs_warm_up_linearly_with_no_step_syncs(name):
    path = os.path.join(ROOT, "configs", name)
    cfg = json.load(open(path))
    assert cfg["optimizer"]["params"].get("fused") is True and cfg["optimizer"]["params"].get("torch_adam") is True
    r = subprocess.run([sys.executable, "-c", SCHEDULE, path], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    w, peak, lrs = out["warmup"], out["peak"], out["lrs"]
    assert out["timers"] == {"throughput": {"enabled": False}}
    # linear warmup (BEiT/MAE): lr at scheduler iteration s (lrs[s]: after s + 1 calls of step(),
    # the first at iteration 0) is peak * s / warmup, not DeepSpeed's default log curve
    # (which gives 27 % of the peak at iteration 10 of a 6,250-step warmup)
    for s in (1, max(1, w // 10), w // 2, w - 1):
        assert math.isclose(lrs[s], peak * s / w, rel_tol=1e-6), (s, lrs[s], peak * s / w)
    assert lrs[w + 2] < peak  # then the cosine decay


def test_sync_count_of_the_bf16_zero2_step_is_zero(tmp_path):
    """Counted at the Python level on the CPU (Tensor.item/tolist/__bool__/..., synchronize),
    between log intervals; the GPU check repeats it with torch.cuda.set_sync_debug_mode."""
    out = tmp_path / "syncs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sync_count.py"), "--bf16", "--steps", "5",
                        "--num_workers", "2", "--demo_samples", "256", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["steps_counted"] == 3 and res["syncs_per_step"] == 0, res["where"]
    # DeepSpeed's own defaults (throughput timer, bf16 overflow check) read the device at every step
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sync_count.py"), "--bf16", "--legacy",
                        "--steps", "4", "--num_workers", "2", "--demo_samples", "256", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["syncs_per_step"] >= 3
