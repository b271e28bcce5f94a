"""Every setting that is on by default with CUDA, forced on in one CPU run
through the real launcher: torch.compile with inductor (the custom kernel ops
inside the graph), a bf16 engine, the tokenizer's bf16 fast path compiled,
the Triton kernels (in Triton's interpreter), and a pinned-memory loader with
worker processes and non-blocking copies. Its losses must be finite and close
to the plain run's (fp32, eager, reference ops)."""
import json
import os
import subprocess
import sys

from cimfast.engine.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _config(tmp, name, bf16):
    with open(os.path.join(ROOT, "configs", "ds_demo.json")) as f:
        cfg = json.load(f)
    cfg["train_batch_size"] = 4
    cfg["bf16"] = {"enabled": bf16}
    cfg["scheduler"]["params"].update(total_num_steps=50, warmup_num_steps=2)
    cfg["cimfast"] = {"preset": "tiny", "max_steps": 2, "log_interval": 1, "checkpoint_interval": 0,
                      "image_interval": 0, "num_workers": 2, "demo_samples": 64, "progress": False}
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _launch(tmp, name, bf16, flags, kernels):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "CIMFAST_KERNELS": kernels, "TRITON_INTERPRET": "1"}
    out = os.path.join(tmp, name)
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "1", "--master_port", str(31500 + os.getpid() % 1000),
           os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", _config(tmp, name, bf16), "--output_dir", out,
           *flags]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out, r.stdout + r.stderr


def test_cuda_defaults_forced_on_train_like_the_plain_path(tmp_path):
    plain, _ = _launch(str(tmp_path), "plain", False, ["--no-compile", "--no-tokenizer_bf16", "--no-pin_memory"],
                       "reference")
    fast, log = _launch(str(tmp_path), "fast", True, ["--compile", "--tokenizer_bf16", "--pin_memory", "--tokenizer_fuse",
                                                      "--cudnn_benchmark"], "triton")
    assert "cimfast kernels: triton" in log and "pinned memory" in log and "2 worker(s)" in log
    assert "skipped on the device" in log  # fused AdamW's found_inf, no host check
    a, b = read_metrics(plain), read_metrics(fast)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        for k in ("loss", "gen_loss", "enh_loss"):
            assert abs(x[k] - y[k]) <= 0.03 * abs(x[k]) + 0.01, (k, x[k], y[k])
    assert os.path.isfile(os.path.join(fast, "picture_final.png"))  # the compiled model in eval mode
