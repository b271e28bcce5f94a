"""Device placement without a GPU: the real entry points' set-up runs with the
training device replaced by ``meta``, through to the first forward. Any
module, buffer or tensor left on the CPU then meets a meta tensor and raises,
where CUDA would raise its own device-mismatch error. Only the device and the
DeepSpeed engine (a thin stand-in that runs the module and stops) differ from
a real run; the code under test is the code a GPU runs."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CIMFAST_KERNELS": "reference"}

SCRIPT = r"""
import json, sys
import torch
from cimfast.engine import distributed, loop

META = torch.device("meta")


class FirstForward(Exception):
    pass


class Engine:  # stands in for DeepSpeed's engine: no .to(device) of its own, so nothing is moved for us
    optimizer = None

    def __init__(self, model):
        self.module = model

    def __call__(self, *args):
        for a in (a for a in args if isinstance(a, torch.Tensor)):
            assert a.device == META, f"a batch tensor reached the model on {a.device}"
        out = self.module(*args)
        raise FirstForward({k: str(v.device) for k, v in out.items() if isinstance(v, torch.Tensor)})

    def train(self):
        self.module.train()

    def train_micro_batch_size_per_gpu(self):
        return 4

    def gradient_accumulation_steps(self):
        return 1


def init_distributed(timeout_minutes=None):
    distributed.fill_rendezvous_env()
    return distributed.Place(0, 1, META)


loop.make_engine = lambda model, ds_cfg, run, groups=None: Engine(model)
entry = sys.argv[1]
if entry == "train":
    from cimfast import train as mod
else:
    from cimfast import tokenizer_train as mod
mod.init_distributed = init_distributed
try:
    mod.main(sys.argv[2:])
except FirstForward as done:
    print("FIRST_FORWARD " + json.dumps(done.args[0]))
    sys.exit(0)
sys.exit("the first forward was never reached")
"""


def _run(entry, args, tmp_path):
    # the k-NN monitor off: its step-0 evaluation compares features on rank 0, which meta tensors cannot
    extra = ["--knn_train_path", ""] if entry == "train" else []
    r = subprocess.run([sys.executable, "-c", SCRIPT, entry, "--output_dir", str(tmp_path / "out"), "--no-progress",
                        "--num_workers", "0", "--pin_memory", *extra, *args],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("FIRST_FORWARD "))
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_pretraining_setup_places_everything_on_the_training_device(tmp_path, objective):
    # the tokenizer's speed switches too: their lines run on the training device (FP8 logits, bf16 io)
    devices = _run("train", ["--objective", objective, "--tokenizer_bf16", "--tokenizer_io_bf16",
                             "--tokenizer_fp8_logits", "--cudnn_benchmark"], tmp_path)
    assert devices and set(devices.values()) == {"meta"}, devices


def test_tokenizer_training_setup_places_everything_on_the_training_device(tmp_path):
    devices = _run("tokenizer_train", ["--heldout_samples", "4"], tmp_path)
    assert devices and set(devices.values()) == {"meta"}, devices
