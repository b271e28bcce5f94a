"""Faults a cluster throws, through the real launcher on the CPU: a checkpoint
write failing on one rank, checkpoints by the clock, a rank that stops answering,
a slow evaluation."""
import os
import re
import subprocess
import time

import pytest

from cimfast.engine import checkpoint
from cimfast.engine.metrics import read_metrics
from tests.runs import BIN, ENV, ROOT, ds_config, free_port, losses, run_train

FULL_DISK_ON_RANK_1 = r"""
import errno, os, sys, torch
real_save = torch.save


def save(obj, f, *args, **kwargs):  # rank 1's ZeRO shard of the step-4 checkpoint meets a full disk
    if os.environ.get("RANK") == "1" and "step_00000004" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)


torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
from cimfast.train import cli
cli()
"""


@pytest.mark.parametrize("policy", ["stop", "warn"])
def test_a_checkpoint_write_failing_on_rank_1_keeps_the_previous_one(tmp_path, policy):
    """ENOSPC on a non-zero rank: every rank learns it, the step-2 checkpoint stays the newest
    complete one and loads; "stop" ends the run with one line naming the path and the cause
    and exit code 4, "warn" trains on and checkpoints at the end."""
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_RANK_1)
    cfg = ds_config(str(tmp_path), "ckpt", steps=6, checkpoint_interval=2, keep_checkpoints=5)
    out = str(tmp_path / "out")
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
           str(script), "--ds_config", cfg, "--output_dir", out, "--checkpoint_errors", policy]
    r = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    printed = r.stdout + r.stderr
    assert "checkpoints/step_00000004 could not be written: rank 1: No space left on device" in printed, printed[-3000:]
    assert not os.path.isdir(os.path.join(out, "checkpoints", "step_00000004"))
    assert not [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith(".tmp-")]
    if policy == "stop":
        assert r.returncode == 4, (r.returncode, printed[-3000:])  # every rank, and the launcher, exit 4
        assert checkpoint.latest_checkpoint(out).endswith("step_00000002")
        assert "Traceback" not in printed
        resumed = run_train(["--ds_config", cfg, "--output_dir", out, "--resume", "auto"], ranks=2)  # it loads
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert sorted(losses(out)) == list(range(1, 7))
    else:
        assert r.returncode == 0, printed[-3000:]
        assert "training goes on" in printed
        assert checkpoint.latest_checkpoint(out).endswith("step_00000006")
        assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")) == \
            ["step_00000002", "step_00000006"]


def test_checkpoints_by_the_clock_on_two_ranks(tmp_path):
    """--checkpoint_minutes: a checkpoint at the first step boundary past the time, decided by
    all ranks together (in the step's one host-side all-reduce), beside the end checkpoint."""
    cfg = ds_config(str(tmp_path), "clock", steps=4, keep_checkpoints=10)
    out = str(tmp_path / "out")
    r = run_train(["--ds_config", cfg, "--output_dir", out, "--checkpoint_minutes", "0.0001"], ranks=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = checkpoint.checkpoint_root(out)
    reasons = {d: checkpoint.read_state(os.path.join(root, d))["reason"] for d in checkpoint.finished_checkpoints(root)}
    assert reasons == {"step_00000001": "clock", "step_00000002": "clock", "step_00000003": "clock",
                       "step_00000004": "end"}, reasons
    r = run_train(["--ds_config", cfg, "--output_dir", str(tmp_path / "off"), "--checkpoint_minutes", "60"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.finished_checkpoints(checkpoint.checkpoint_root(str(tmp_path / "off"))) == ["step_00000004"]


# rank 1 stops itself (SIGSTOP: its sockets stay open, as a hung GPU's or a frozen node's
# would) at a chosen point of step 3: inside the step, or at the step boundary
FREEZE_RANK_1 = r"""
import os, signal, sys
import deepspeed
from cimfast.engine import guards
WHERE = os.environ["FREEZE_AT"]
calls = {"n": 0}


def freezing(real):
    def call(*args, **kwargs):
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(*args, **kwargs)
    return call


if WHERE == "step":  # the third backward: rank 0 then waits in ZeRO's gradient reduction
    deepspeed.DeepSpeedEngine.backward = freezing(deepspeed.DeepSpeedEngine.backward)
else:  # the third step boundary: rank 0 then waits in the stop-and-clock all-reduce
    guards.StopRequest.agreed = freezing(guards.StopRequest.agreed)
sys.argv = ["train.py", *sys.argv[1:]]
from cimfast.train import cli
cli()
"""

PHASES = {"step": "training step", "boundary": "the ranks' stop and clock agreement"}


def launch(tmp_path, script, cfg, out, *args, env=None):
    """``script`` under the deepspeed launcher on 2 ranks, with output in ``out``."""
    path = tmp_path / "launched.py"
    path.write_text(script)
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", free_port(),
           str(path), "--ds_config", cfg, "--output_dir", out, *args]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("where", ["step", "boundary"])
def test_a_frozen_rank_ends_the_job_within_the_step_timeout(tmp_path, where):
    """Rank 1 frozen in the middle of step 3 or at its boundary: rank 0, waiting in a
    collective, ends within the step bound (30 s) plus 60 s, naming the step and phase, exit
    code 5 (its watchdog, or the process group's timeout, whichever comes first); the
    launcher ends the job and no process is left."""
    psutil = pytest.importorskip("psutil")
    out = str(tmp_path / "out")
    proc = launch(tmp_path, FREEZE_RANK_1, ds_config(str(tmp_path), "frozen", steps=40), out,
                  "--step_timeout_minutes", "0.5", "--long_timeout_minutes", "5", env={"FREEZE_AT": where})
    ranks = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ranks = ranks or [p for p in psutil.Process(proc.pid).children(recursive=True)
                              if "--local_rank=" in " ".join(p.cmdline())]
            if any(p.status() == psutil.STATUS_STOPPED for p in ranks):
                break
            time.sleep(0.2)
        t0 = time.time()
        printed, _ = proc.communicate(timeout=30 + 60 + 30)
        took = time.time() - t0
        left = [p.pid for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in ranks:  # never leave a stopped process behind, whatever the test found
            if p.is_running():
                p.kill()
    assert len(ranks) == 2 and proc.returncode != 0, printed[-3000:]
    assert took <= 30 + 60, (took, printed[-3000:])
    assert re.search(rf"rank 0: .*in step 3 \({PHASES[where]}\)", printed), printed[-3000:]
    assert "Exit code 5" in printed or "exit code 5" in printed, printed[-3000:]
    assert left == [], left


SLOW_EVALUATION_ON_RANK_0 = r"""
import os, sys, time
from cimfast.evaluation import knn
real = knn.LabelledSplits.knn
calls = {"n": 0}


def slow(*args, **kwargs):  # rank 0's k-NN at step 2 takes 25 s more, past the 15 s training timeout
    result = real(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 2 and os.environ.get("RANK") == "0":
        time.sleep(25)
    return result


knn.LabelledSplits.knn = slow
sys.argv = ["train.py", *sys.argv[1:]]
from cimfast.train import cli
cli()
"""


def test_a_slow_rank_0_evaluation_does_not_stop_a_healthy_run(tmp_path):
    """Rank 0's k-NN evaluation outlasts the training timeout while rank 1 waits: both wait
    under the long timeout and leave the evaluation together, and the run completes."""
    from tests.labelled import make_labelled

    knn = {"knn_train_path": make_labelled(str(tmp_path / "knn_train"), classes=3, per_class=4),
           "knn_val_path": make_labelled(str(tmp_path / "knn_val"), classes=3, per_class=3, seed=1),
           "knn_interval": 2}
    out = str(tmp_path / "out")
    proc = launch(tmp_path, SLOW_EVALUATION_ON_RANK_0, ds_config(str(tmp_path), "slow", steps=4, **knn), out,
                  "--step_timeout_minutes", "0.25", "--long_timeout_minutes", "5")
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, printed[-3000:]
    evals = [r for r in read_metrics(out) if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[1]["eval_seconds"] >= 25, evals
