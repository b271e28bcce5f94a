"""Signals as users send them, through the real launchers, with data workers on:
Ctrl-C or SIGTERM to the whole process group (a terminal, a scheduler), to the
launcher alone, or to a rank alone. Every way ends the same: the rank finishes
its step, writes a checkpoint (reason "signal"), exits 0, and no process of
the run is left behind.

The launchers' own exit codes after a signal are theirs, not the run's: the
``deepspeed`` command installs no handler on one node and dies of the signal;
DeepSpeed's per-node launcher exits 1 whenever it forwarded a signal; torchrun
exits 1. A signal to a rank alone leaves every launcher exiting 0."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from cimfast.engine import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _config(tmp) -> str:
    with open(os.path.join(ROOT, "configs", "ds_demo.json")) as f:
        cfg = json.load(f)
    cfg["train_batch_size"] = 8
    cfg["scheduler"]["params"].update(total_num_steps=50, warmup_num_steps=3)
    cfg["cimfast"] = {"preset": "tiny", "max_steps": 500, "log_interval": 1, "checkpoint_interval": 0,
                      "image_interval": 0, "num_workers": 2, "demo_samples": 256, "progress": False}
    path = os.path.join(tmp, "ds.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _start(launcher, tmp):
    out = os.path.join(tmp, "out")
    if launcher == "deepspeed":
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "1", "--master_port", _free_port()]
    else:
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "1", "--master_port", _free_port()]
    cmd += [os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", _config(tmp), "--output_dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(tmp, "log.txt"), "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    metrics = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= 2:
            break
        time.sleep(0.3)
    assert proc.poll() is None, open(os.path.join(tmp, "log.txt")).read()[-3000:]
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in tree if p.name() == "pt_data_worker"]
    assert len(workers) == 2, [(p.pid, p.name()) for p in tree]  # the data workers are on
    return proc, tree, out


def _rank(tree):
    """The training process: the parent of the data workers."""
    return next(p for p in tree if p.name() == "pt_data_worker").parent()


@pytest.mark.parametrize("launcher,target,sig", [
    ("deepspeed", "group", signal.SIGTERM),     # a scheduler's SIGTERM to the job
    ("deepspeed", "group", signal.SIGINT),      # Ctrl-C in the terminal
    ("deepspeed", "launcher", signal.SIGTERM),  # kill <pid of the deepspeed command>
    ("deepspeed", "rank", signal.SIGTERM),
    ("torchrun", "launcher", signal.SIGTERM),
    ("torchrun", "group", signal.SIGINT),
])
def test_a_signal_ends_the_run_with_a_checkpoint_and_no_process_left(tmp_path, launcher, target, sig):
    proc, tree, out = _start(launcher, str(tmp_path))
    if target == "group":
        os.killpg(proc.pid, sig)
    elif target == "launcher":
        proc.send_signal(sig)
    else:
        _rank(tree).send_signal(sig)
    code = proc.wait(timeout=120)
    _, alive = psutil.wait_procs(tree, timeout=60)
    log = open(tmp_path / "log.txt").read()
    assert not alive, ([(p.pid, p.name()) for p in alive], log[-3000:])
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out))
    assert state["reason"] == "signal" and state["step"] >= 2, (state, log[-3000:])
    assert "stopped by signal" in log and "DataLoader worker" not in log
    if target == "rank":
        assert code == 0, log[-3000:]  # the launchers report the rank's clean exit
    # the run continues from the checkpoint
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "train.py"), "--ds_config",
                        os.path.join(str(tmp_path), "ds.json"), "--output_dir", out, "--resume", "auto",
                        "--max_steps", str(state["step"] + 1), "--num_workers", "0"],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.read_state(checkpoint.latest_checkpoint(out))["step"] == state["step"] + 1
