"""Training runs as users start them (subprocesses, gloo on the CPU), shared by the
tests of the training entry point and of the faults a cluster throws."""
import json
import os
import socket
import subprocess
import sys

from cimfast.engine.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def ds_config(tmp, name, stage=2, batch=8, steps=6, **cim):
    with open(os.path.join(ROOT, "configs", "ds_demo.json")) as f:
        cfg = json.load(f)
    cfg["train_batch_size"] = batch
    cfg["zero_optimization"] = {"stage": stage}
    # a fixed schedule, so runs of different --max_steps follow the same learning rates
    cfg["scheduler"]["params"].update(total_num_steps=50, warmup_num_steps=3)
    cfg["cimfast"] = {"preset": "tiny", "max_steps": steps, "log_interval": 1, "checkpoint_interval": 0,
                      "image_interval": 0, "num_workers": 0, "demo_samples": 256, "progress": False, **cim}
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def diverging_config(tmp, name, **cim):
    """A config whose learning rate (1e9, no clipping) blows the weights up within a few steps."""
    path = ds_config(tmp, name, steps=30, max_nonfinite=2, **cim)
    with open(path) as f:
        cfg = json.load(f)
    cfg["optimizer"]["params"]["lr"] = 1e9
    cfg["gradient_clipping"] = 0.0
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def free_port() -> str:
    """A port no process listens on now, for the launcher's --master_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_train(args, ranks=1, timeout=600, port=None, **popen):
    if ranks == 1:
        cmd = [sys.executable, os.path.join(ROOT, "cimfast", "train.py")]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", port or free_port(),
               os.path.join(ROOT, "cimfast", "train.py")]
    return subprocess.run(cmd + args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **popen)


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}
