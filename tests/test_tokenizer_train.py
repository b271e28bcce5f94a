"""Tokenizer training through the same engine and loop as pre-training."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cimfast.engine import checkpoint
from cimfast.engine.metrics import read_metrics
from cimfast.tokenizer.dvae import codebook_stats, dvae_loss, kl_to_uniform, logit_laplace_nll
from cimfast.tokenizer.files import load_tokenizer
from cimfast.tokenizer.model import TokenizerSpec
from cimfast.tokenizer_train import DVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
SMALL = ["--n_hid", "16", "--n_init", "16", "--vocab_size", "64", "--image_size", "32", "--num_workers", "0",
         "--log_interval", "1", "--image_interval", "0", "--checkpoint_interval", "0", "--no-progress",
         "--heldout_samples", "8", "--demo_samples", "512"]


def test_logit_laplace_nll_is_a_density():
    """exp(-nll) integrates to 1 over (eps, 1 - eps) mapped pixels (numerically)."""
    xs = torch.linspace(0.1 + 1e-4, 0.9 - 1e-4, 20001)
    params = torch.tensor([0.3, 0.3, 0.3, -1.0, -1.0, -1.0]).view(1, 6, 1, 1)
    dens = []
    for x in xs.split(2000):
        v = x.view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
        nll = torch.stack([logit_laplace_nll(v[i:i + 1], params) for i in range(len(v))])
        dens.append(torch.exp(-nll))
    dens = torch.cat(dens)
    integral = torch.trapezoid(dens, xs)
    assert 0.9 < integral <= 1.0 + 1e-3  # the tails outside (0.1, 0.9) hold the rest


def test_kl_to_uniform_bounds():
    v = 16
    assert abs(float(kl_to_uniform(torch.zeros(2, v, 3, 3)))) < 1e-6
    peaked = torch.full((1, v, 1, 1), -1e4)
    peaked[0, 0] = 0
    assert abs(float(kl_to_uniform(peaked)) - torch.log(torch.tensor(float(v)))) < 1e-4
    stats = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert abs(stats["perplexity"] - 2) < 1e-9 and stats["used_fraction"] == 0.5


def test_few_steps_lower_the_reconstruction_loss():
    torch.manual_seed(0)
    m = DVAE(TokenizerSpec(n_hid=16, n_init=16, n_blk_per_group=1, vocab_size=64))
    x = torch.rand(8, 3, 32, 32)
    x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)  # smooth images: learnable in a few steps
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        out = dvae_loss(m, x, tau=1.0, beta=0.0, sample_keys=torch.arange(8))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["nll"])
    assert float(out["nll"]) < first - 0.1


def _run(out, *extra):
    """12-step schedules whatever --max_steps is, so a 6-step run is the first half of a 12-step one."""
    cfg_path = os.path.join(os.path.dirname(out), "ds_tok.json")
    with open(os.path.join(ROOT, "configs", "ds_tokenizer_demo.json")) as f:
        cfg = json.load(f)
    cfg["scheduler"]["params"].update(total_num_steps=12, warmup_num_steps=2)
    cfg["train_batch_size"] = 8
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, os.path.join(ROOT, "cimfast", "tokenizer_train.py"), "--ds_config", cfg_path,
           "--output_dir", out, "--tau_steps", "12", "--kl_ramp_steps", "3", *SMALL, *extra]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok") / "run")
    r = _run(out, "--max_steps", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_tokenizer_training_run(trained):
    recs = read_metrics(trained)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(abs(r["nll"]) < 10 and r["kl"] >= 0 for r in recs)  # (the loss falls: test_few_steps_...)
    report = json.load(open(os.path.join(trained, "tokenizer_report.json")))
    assert set(report["heldout"]) >= {"mse", "psnr", "perplexity", "used_fraction"}
    assert os.path.isfile(os.path.join(trained, "reconstructions.png"))
    # the result loads through the same loader as the official weights and runs the same code path
    tok = load_tokenizer(os.path.join(trained, "tokenizer.safetensors"))
    assert tok.vocab_size == 64
    x = torch.rand(2, 3, 32, 32)
    ids = tok.tokenize(x)
    assert ids.shape == (2, 4, 4) and tok.decode(ids).shape == x.shape


def test_tokenizer_training_resumes_exactly(trained, tmp_path):
    out = str(tmp_path / "resumed")
    r = _run(out, "--max_steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(out, "--max_steps", "12", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    a = {r["step"]: r["nll"] for r in read_metrics(trained)}
    b = {r["step"]: r["nll"] for r in read_metrics(out)}
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    assert checkpoint.read_state(checkpoint.latest_checkpoint(out))["step"] == 12


def test_a_stopped_tokenizer_run_writes_no_tokenizer(tmp_path):
    """SIGTERM mid-run: a checkpoint to resume from, but no tokenizer.safetensors
    or report claiming a finished run."""
    import signal
    import time

    out = str(tmp_path / "stopped")
    cfg_dir = str(tmp_path)
    with open(os.path.join(ROOT, "configs", "ds_tokenizer_demo.json")) as f:
        cfg = json.load(f)
    cfg["train_batch_size"] = 8
    with open(os.path.join(cfg_dir, "ds_tok.json"), "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, os.path.join(ROOT, "cimfast", "tokenizer_train.py"), "--ds_config",
           os.path.join(cfg_dir, "ds_tok.json"), "--output_dir", out, "--max_steps", "1000", *SMALL]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(out)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert checkpoint.read_state(checkpoint.latest_checkpoint(out))["reason"] == "signal"
    assert not os.path.exists(os.path.join(out, "tokenizer.safetensors"))
    assert not os.path.exists(os.path.join(out, "tokenizer_report.json"))


def test_the_usage_term_keeps_the_codebook_from_collapsing():
    """200 steps on the demo photos at 32 px, 128 codes: DALL-E's recipe alone
    collapses to about a tenth of the codebook (one code wins everywhere at
    the start and the per-cell KL to the uniform prior cannot undo it); the
    codebook-usage term keeps over a quarter of the codes in use."""
    from cimfast.pipelines.datasets import DemoDataset
    from cimfast.pipelines.views import as_unit
    from cimfast.tokenizer.dvae import beta_at, tau_at

    spec = TokenizerSpec(n_hid=16, n_init=16, n_blk_per_group=1, vocab_size=128)
    ds = DemoDataset(32, None, samples=10**6, seed=0)
    held = DemoDataset(32, None, samples=64, split="heldout", seed=1)
    heldout = as_unit(torch.stack([held[(0, i)]["images"] for i in range(64)]))
    used = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        m = DVAE(spec, usage_weight=weight)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        for s in range(200):
            x = as_unit(torch.stack([ds[(0, s * 16 + i)]["images"] for i in range(16)]))
            out = m(x, torch.arange(16) + s * 16, tau_at(s, 200, 1.0, 0.25), beta_at(s, 50, 6.6))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        with torch.no_grad():
            used[weight] = codebook_stats(m.encoder(heldout * 0.8 + 0.1).argmax(1), 128)["used_fraction"]
    assert used[0.0] < 0.2 <= 0.25 <= used[1.0], used


def test_the_shipped_tokenizer_report_is_what_the_asset_does():
    """The report beside the shipped tiny tokenizer holds its held-out numbers, measured again here."""
    import json

    from cimfast.config.settings import RunConfig
    from cimfast.objective.cim import TINY_TOKENIZER
    from cimfast.tokenizer.files import load_tokenizer
    from cimfast.tokenizer_train import TokenizerConfig, evaluate, heldout_images

    with open(TINY_TOKENIZER.replace(".safetensors", "_report.json")) as f:
        report = json.load(f)["heldout"]
    metrics, _ = evaluate(load_tokenizer(TINY_TOKENIZER), heldout_images(TokenizerConfig(), RunConfig(seed=0)))
    assert metrics["codes_used"] == report["codes_used"] and metrics["codes_used"] >= 256  # half the codebook
    assert metrics["perplexity"] == pytest.approx(report["perplexity"], rel=1e-4)
    assert metrics["psnr"] == pytest.approx(report["psnr"], abs=1e-3)
