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

from cimfast.engine.guards import NonFiniteGuard, device_skip_optimizer
from cimfast.engine.patches import _unscale_and_clip_grads_on_device

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
    guard.after_update()
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

    optimizer = None  # the wrapped torch optimizer (none here: no found_inf)

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
from cimfast.engine.distributed import fill_auto
from cimfast.config.settings import RunConfig
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


def test_a_nonfinite_gradient_norm_with_a_finite_loss_skips_the_step():
    """An overflow in the backward (finite loss, infinite gradient): the clipping
    replacement ORs it into the optimizer's found_inf, as DeepSpeed's own check would."""
    m, opt = _model_and_opt()
    opt.found_inf = torch.zeros(())

    class Zero(_ZeroLike):
        optimizer = opt

    grads = torch.randn(10)
    _unscale_and_clip_grads_on_device(Zero(3.0), [grads.clone()], torch.tensor(2.0))
    assert float(opt.found_inf) == 0.0
    for clip in (3.0, 0.0):  # with and without clipping
        opt.found_inf.zero_()
        _unscale_and_clip_grads_on_device(Zero(clip), [grads.clone()], torch.tensor(float("inf")))
        assert float(opt.found_inf) == 1.0


@pytest.mark.parametrize("value", [2.5, 0.0, float("inf"), -float("inf"), float("nan")])
def test_norm_masking_without_host_sync_matches_deepspeed(value):
    """The sync-free twin of DeepSpeed's gradient-norm masking writes what DeepSpeed's writes."""
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    from cimfast.engine.patches import mask_nan_or_inf_on_device

    ours, theirs = torch.tensor(value), torch.tensor(value)
    mask_nan_or_inf_on_device(ours, device="cpu")
    mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
    assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype
    assert float(ours) == (value if value == value and abs(value) != float("inf") else -1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_norm_masking_makes_no_cuda_sync():
    """DeepSpeed's version makes two host syncs on CUDA (counted on an H200); the twin none."""
    from cimfast.engine.patches import mask_nan_or_inf_on_device

    norm = torch.tensor(float("inf"), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask_nan_or_inf_on_device(norm, device=norm.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(norm) == -1.0


def test_meter_leaves_nonfinite_values_out_of_the_means():
    from cimfast.engine.metrics import Meter

    meter = Meter(world=1, global_batch=4, flops_per_image=0.0, peak=None, step=0)
    for v in (1.0, float("nan"), 3.0):
        meter.add({"loss": torch.tensor(v), "acc": torch.tensor(0.5)})
    out = meter.report(3, {"n": torch.tensor(7)})
    assert out["loss"] == 2.0 and out["acc"] == 0.5 and out["n"] == 7


DS_SKIP = r"""
import json, os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from cimfast.config.settings import RunConfig
from cimfast.engine.guards import NonFiniteGuard
from cimfast.engine.patches import remove_clip_sync
from cimfast.engine.distributed import fill_auto

class InfGrad(torch.autograd.Function):  # identity forward, infinite gradient
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return g * float("inf")

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
ds = json.load(open(sys.argv[2]))
ds.pop("cimfast")
ds.update(train_batch_size=4, bf16={"enabled": True}, zero_optimization={"stage": 2})
fill_auto(ds, RunConfig(max_steps=10))
assert ds["bf16"]["check_grad_overflow"] is False
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
remove_clip_sync(engine.optimizer)
from deepspeed.runtime.zero import stage_1_and_2
from cimfast.engine.patches import mask_nan_or_inf_on_device
assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is mask_nan_or_inf_on_device
guard = NonFiniteGuard(engine.optimizer, torch.device("cpu"), 1)
assert guard.on_device
# the one-kernel gradient norm against DeepSpeed's own loop, finite and not
opt = engine.optimizer
grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (7, 300, 5)]
params = [torch.nn.Parameter(torch.zeros(1)) for _ in grads]
new, old = opt.get_grad_norm_direct(grads, params), opt._cimfast_grad_norm_direct(grads, params)
assert torch.allclose(new, old, rtol=1e-6, atol=0) and new.dtype == old.dtype, (new, old)
assert torch.allclose(new, torch.cat(grads).double().norm().float(), rtol=1e-6)
grads[1][3] = float("nan")
assert float(opt.get_grad_norm_direct(grads, params)) == float(opt._cimfast_grad_norm_direct(grads, params)) == -1.0

def step(x, inf_grad=False):
    h = engine.module[0](x.to(torch.bfloat16))
    loss = engine.module[1](InfGrad.apply(h) if inf_grad else h).float().square().mean()
    guard.skip(loss)
    engine.backward(loss)
    guard.before_update()
    engine.step()
    guard.after_update()

def weights():
    return [p.detach().float().clone() for p in engine.optimizer.single_partition_of_fp32_groups]

x = torch.randn(4, 8)
step(x)
before = weights()
step(torch.full((4, 8), float("nan")))       # non-finite loss
step(x, inf_grad=True)                        # finite loss, infinite gradient
after = weights()
assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed the weights"
step(x)
assert not all(torch.equal(a, b) for a, b in zip(after, weights())), "a good step after them did nothing"
assert int(guard.total) == 2
print("OK")
"""


def test_the_device_skip_through_deepspeed_bf16_zero2(tmp_path):
    """Through DeepSpeed's own ZeRO-2 bf16 optimizer wrapper: a non-finite loss and
    an infinite gradient with a finite loss leave the fp32 master weights untouched."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    r = subprocess.run([sys.executable, "-c", DS_SKIP, port, os.path.join(ROOT, "configs", "ds_demo.json")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_fp16_checkpoint_state_passes_the_safe_load(tmp_path):
    """fp16 runs save DeepSpeed's DynamicLossScaler: it is allow-listed."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from cimfast.engine.checkpoint import verify_files

    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "w": torch.zeros(3)},
               tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_files(str(tmp_path))


def test_the_watchdog_switches_the_group_timeouts_only_when_the_bound_changes():
    """Training phases get the step bound, long phases the long bound, and the process groups
    that plus a minute, from the start (groups made after start-up had torch's default); an
    unchanged bound sets nothing."""
    from cimfast.engine.watchdog import StepWatchdog

    set_to = []
    dog = StepWatchdog(0.5, 5, rank=0, retime=set_to.append)
    try:
        dog.enter("training step", 1, long=True)  # the first step compiles: still the start-up bound
        dog.enter("checkpoint, evaluation or picture", 1, long=True)
        dog.enter("the ranks' stop and clock agreement", 1)
        dog.enter("training step", 2)
        dog.enter("checkpoint, evaluation or picture", 2, long=True)
        assert set_to == [360.0, 90.0, 360.0]  # each bound plus a minute, so the watchdog fires first
        assert dog.where() == "step 2 (checkpoint, evaluation or picture)"
    finally:
        dog.close()
    set_to.clear()
    off = StepWatchdog(0, 5, rank=0, retime=set_to.append)  # no watchdog: the groups keep the long timeout
    off.enter("training step", 1)
    assert set_to == [360.0]


GROUP_TIMEOUTS = r"""
import sys, torch, torch.distributed as dist
from datetime import timedelta
from cimfast.engine.distributed import fill_rendezvous_env, set_group_timeouts
fill_rendezvous_env()
dist.init_process_group("gloo", timeout=timedelta(minutes=60))
groups = [dist.distributed_c10d._get_default_group(), dist.new_group(backend="gloo"), dist.new_group([0])]
set_group_timeouts(7)
print([g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups])
"""


def test_group_timeouts_reach_every_process_group():
    """The default group and every group made after it (DeepSpeed's, ZeRO's, the stop request's)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", GROUP_TIMEOUTS], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "[7.0, 7.0, 7.0]", r.stdout


def test_each_ninja_builds_deepspeeds_ops_in_a_folder_of_its_own(monkeypatch):
    """An activated environment finds its own ninja, a plain .venv/bin/deepspeed the system's: two
    ninjas sharing a build folder rebuilt the op (about 23 s) at every switch between them."""
    from cimfast.engine.distributed import extensions_dir

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/ninja")
    system = extensions_dir()
    monkeypatch.setattr("shutil.which", lambda name: "/work/.venv/bin/ninja")
    assert extensions_dir() != system and extensions_dir().startswith(os.path.dirname(system))
