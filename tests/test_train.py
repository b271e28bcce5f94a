"""The training entry point, run as users run it (subprocesses, gloo on the CPU)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cimfast.engine import checkpoint
from cimfast.engine.metrics import read_metrics
from tests.labelled import make_labelled
from tests.runs import BIN, ENV, ROOT, diverging_config, ds_config, free_port, losses, run_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 1-rank run and one 2-rank run at the same global batch (ZeRO-2, fp32)."""
    tmp = str(tmp_path_factory.mktemp("train"))
    knn = {"knn_train_path": make_labelled(os.path.join(tmp, "knn_train"), classes=4, per_class=7, noise=150, contrast=0.08),
           "knn_val_path": make_labelled(os.path.join(tmp, "knn_val"), classes=4, per_class=5, seed=1, noise=150, contrast=0.08),
           "knn_interval": 3}
    cfg = ds_config(tmp, "zero2", **knn)
    one = os.path.join(tmp, "one")
    r = run_train(["--ds_config", cfg, "--output_dir", one, "--image_interval", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    two = os.path.join(tmp, "two")
    port = free_port()
    r2 = run_train(["--ds_config", cfg, "--output_dir", two], ranks=2, port=port)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "one": one, "two": two, "two_printed": r2.stdout + r2.stderr, "port": port}


def test_one_and_two_ranks_agree_zero2(runs):
    a, b = losses(runs["one"]), losses(runs["two"])
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_a_cpu_run_leaves_no_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce (under its launcher) maps a 69 MB /dev/shm file per rank,
    named by the master port, and never unlinks it: memory lost until reboot, run after run."""
    port = runs["port"]
    # the 2-rank run under the launcher had DeepSpeed's shared-memory all-reduce (on each rank)
    assert runs["two_printed"].count("deepspeed_shm_comm_op built successfully") == 2
    left = [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f]
    assert not left, left


def test_gradient_accumulation_matches(runs, tmp_path):
    """1 rank, micro-batch 4 x 2 accumulation = the same global batch of 8."""
    cfg_path = ds_config(str(tmp_path), "gas", steps=3)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = 4
    del cfg["gradient_accumulation_steps"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "gas")
    r = run_train(["--ds_config", cfg_path, "--output_dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(runs["one"]), losses(out)
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_bf16_under_torchrun(tmp_path):
    cfg_path = ds_config(str(tmp_path), "bf16", steps=3)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["bf16"] = {"enabled": True}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "bf16")
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "1", "--master_port", free_port(),
           os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", cfg_path, "--output_dir", out]
    r = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(out)
    assert len(recs) == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in recs)


def test_outputs_of_a_run(runs):
    out = runs["one"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "picture_step00000003.png", "picture_final.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "tensorboard"))
    assert checkpoint.latest_checkpoint(out).endswith("step_00000006")
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert {"loss", "gen_loss", "enh_loss", "gen_acc", "replaced_frac", "lr", "img_per_s", "data_wait",
            "grad_norm", "enh_loss_trivial", "gen_loss_trivial", "gen_gap"} <= set(recs[0])
    assert all(r["gen_gap"] == pytest.approx(r["gen_loss_trivial"] - r["gen_loss"]) for r in recs)
    # the loss falls: the generator learns the tokens quickly
    assert recs[-1]["gen_loss"] < recs[0]["gen_loss"]


def test_knn_monitor_logs_top1_sharded_over_ranks(runs):
    """The monitor runs every knn_interval steps and at the end; 2 ranks (each extracting
    half the images) find the neighbours 1 rank does."""
    knn = {n: {r["step"]: r for r in read_metrics(runs[n]) if "knn_top1" in r} for n in ("one", "two")}
    assert sorted(knn["one"]) == [3, 6] and sorted(knn["two"]) == [3, 6]
    init = {n: [r for r in read_metrics(runs[n]) if "knn_top1_init" in r] for n in ("one", "two")}
    assert [r["step"] for r in init["one"]] == [0]
    assert init["one"][0]["knn_top1_init"] == init["two"][0]["knn_top1_init"]
    for step in (3, 6):
        one, two = knn["one"][step], knn["two"][step]
        assert 0 <= one["knn_top1"] <= 100
        for key in ("knn_top1", "knn_top1_cls", "knn_top5"):
            assert one[key] == two[key], key
            # each later record shows its gain over the step-0 value of the same feature kind
            assert one[f"{key}_gain"] == pytest.approx(one[key] - init["one"][0][f"{key}_init"]), key
        assert one["eval_seconds"] > 0


def test_zero3_two_ranks_and_export(runs, tmp_path):
    cfg = ds_config(str(tmp_path), "zero3", stage=3, steps=3)
    out = str(tmp_path / "z3")
    r = run_train(["--ds_config", cfg, "--output_dir", out], ranks=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = losses(runs["one"]), losses(out)
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])
    r = subprocess.run([sys.executable, "-m", "cimfast.export", out, str(tmp_path / "enh.safetensors")],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "model = timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=112, depth=4)" in r.stdout
    _load_into_timm(str(tmp_path / "enh.safetensors"))


def _load_into_timm(path):
    """Build the model the file's metadata names, exactly as the export command prints it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    timm = pytest.importorskip("timm")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["timm_create"] == "timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=112, depth=4)"
    assert json.loads(meta["timm_kwargs"]) == {"img_size": 112, "depth": 4}
    m = eval(meta["timm_create"], {"timm": timm})
    m.load_state_dict(load_file(path), strict=True)


def test_export_zero2_into_timm(runs, tmp_path):
    from cimfast.export import export

    info = export(runs["one"], str(tmp_path / "e.safetensors"))
    assert info["step"] == 6
    _load_into_timm(str(tmp_path / "e.safetensors"))


def test_sigterm_checkpoints_and_resume_continues_exactly(runs, tmp_path):
    out = str(tmp_path / "sig")
    cmd = [sys.executable, os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", runs["cfg"], "--output_dir", out,
           "--max_steps", "200"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and max(losses(out), default=0) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    stopped = checkpoint.read_state(checkpoint.latest_checkpoint(out))
    assert stopped["reason"] == "signal" and 2 <= stopped["step"] < 6, stopped
    r = run_train(["--ds_config", runs["cfg"], "--output_dir", out, "--resume", "auto", "--max_steps", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 7))
    # every logged metric after the stop equals the uninterrupted run's, the accumulated ones
    # (gen_loss_trivial: the codes counted since step 0) and the k-NN gains included;
    # timings, throughput and memory are the machine's, not the run's
    machine = {"img_per_s", "img_per_s_per_device", "mfu", "data_wait", "step_time", "peak_mem_gb", "eval_seconds"}
    records = {n: {(r["step"], tuple(sorted(r))): r for r in read_metrics(d)}
               for n, d in (("a", runs["one"]), ("b", out))}
    after = [k for k in records["b"] if k[0] > stopped["step"]]
    assert len(after) >= 6 - stopped["step"] and any("gen_loss_trivial" in k[1] for k in after)
    for k in after:
        ra, rb = records["a"][k], records["b"][k]
        for key in set(rb) - machine:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-6), (k[0], key, ra[key], rb[key])


KILL_DURING_SAVE = r"""
import os, signal, sys
from cimfast.engine import checkpoint
class Engine:  # writes half a checkpoint, then the process is killed
    def save_checkpoint(self, root, tag, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save(Engine(), sys.argv[1], 999, {"step": 999}, keep=3, rank=0)
"""


def test_sigkill_during_checkpoint_write_keeps_previous(runs, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(runs["one"], out)
    before = checkpoint.latest_checkpoint(out)
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, out], env=ENV)
    assert r.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(out) == before
    from cimfast.engine.checkpoint import full_state_dict

    sd = full_state_dict(before)  # the previous checkpoint still loads
    assert any(k.startswith("enhancer.") for k in sd) and all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.parametrize("section,flag,key", [
    ({"windw": 9}, [], "windw"),
    ({"window": "nine"}, [], "window"),
    ({"num_masked": 500}, [], "num_masked"),
    ({}, ["--objective", "mae"], "objective"),
    ({}, ["--max_steps", "0"], "max_steps"),
])
def test_bad_config_names_the_key_before_building(tmp_path, section, flag, key):
    cfg = ds_config(str(tmp_path), "bad", **section)
    out = str(tmp_path / "never")
    r = run_train(["--ds_config", cfg, "--output_dir", out] + flag, timeout=120)
    assert r.returncode == 2
    assert key in r.stderr and "configuration error" in r.stderr
    assert not os.path.exists(out)  # nothing was built or written


def _run_on_a_terminal(cmd, columns=120) -> str:
    """Runs cmd with stdout and stderr on a pseudo-terminal; returns what it printed."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    import select

    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([leader], [], [], 1.0)[0]:
            continue
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: every process that held it ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    if proc.poll() is None and time.monotonic() >= deadline:
        proc.kill()
    assert proc.wait(timeout=60) == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_is_a_bar_on_a_terminal_and_log_lines_in_a_file(tmp_path):
    """A bar's redraws in a cluster's log file are one endless line with log records glued
    to it; on a terminal, log records print on their own lines above the bar."""
    cfg = ds_config(str(tmp_path), "p", steps=4, checkpoint_interval=2, progress=True)
    cmd = [sys.executable, os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", cfg]
    r = run_train(["--ds_config", cfg, "--output_dir", str(tmp_path / "file")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "%|" not in r.stderr and "it/s" not in r.stderr  # no bar into a file
    assert "before it has started" not in r.stdout + r.stderr  # DeepSpeed's warning on every correct run
    assert [int(n) for n in re.findall(r"cimfast INFO: step (\d+): \{", r.stderr)] == [1, 2, 3, 4]
    shown = _run_on_a_terminal(cmd + ["--output_dir", str(tmp_path / "tty")])
    assert "%|" in shown and "4/4" in shown  # the bar, to its end
    assert "cimfast INFO: step" not in shown  # the metrics are in the bar
    starts = [m.start() for m in re.finditer(r"\d\d:\d\d:\d\d cimfast ", shown)]
    assert any("checkpoint (interval)" in shown[i:i + 200] for i in starts)
    for i in starts:  # each record on its own line, none glued to the bar
        assert i == 0 or shown[i - 1] in "\r\n", repr(shown[max(0, i - 80):i + 40])
    # a terminal that reports no width (tqdm would draw nothing): the log lines instead
    shown = _run_on_a_terminal(cmd + ["--output_dir", str(tmp_path / "narrow")], columns=0)
    assert "%|" not in shown and len(re.findall(r"cimfast INFO: step \d+: \{", shown)) == 4, shown[-2000:]


def test_help_explains_options():
    r = subprocess.run([sys.executable, "-m", "cimfast.train", "--help"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ("--output_dir", "--max_steps", "--resume", "--objective", "--preset", "--data_path"):
        assert opt in r.stdout


def test_nonfinite_losses_stop_with_checkpoint(tmp_path):
    cfg_path = diverging_config(str(tmp_path), "nan")
    out = str(tmp_path / "nan")
    r = run_train(["--ds_config", cfg_path, "--output_dir", out])
    assert r.returncode == 3, r.stderr[-3000:]
    assert "non-finite losses in a row" in r.stderr
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out))
    assert state["reason"] == "non-finite losses" and state["nonfinite_total"] >= 2


def test_dali_cpu_pipeline_trains_and_resumes_exactly(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg_path = ds_config(str(tmp_path), "dali", steps=4)
    common = ["--ds_config", cfg_path, "--pipeline", "dali-cpu", "--cache_dir", str(tmp_path / "cache")]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = run_train(common + ["--output_dir", full])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data pipeline: dali-cpu" in r.stderr
    r = run_train(common + ["--output_dir", part, "--max_steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(common + ["--output_dir", part, "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


TAMPER = r"""
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
path = sys.argv[1]
states = torch.load(path, map_location="cpu", weights_only=False)
states["extra"] = Payload()
torch.save(states, path)
"""


def test_tampered_checkpoints_are_refused_before_anything_runs_them(runs, tmp_path):
    """A checkpoint whose files would run code when unpickled: export and --resume
    refuse it in one line (exit 2), and the code never runs."""
    out = str(tmp_path / "tampered")
    shutil.copytree(runs["one"], out)
    mark = tmp_path / "ran"
    target = os.path.join(checkpoint.latest_checkpoint(out), "mp_rank_00_model_states.pt")
    r = subprocess.run([sys.executable, "-c", TAMPER, target, str(mark)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and not mark.exists(), r.stderr
    r = subprocess.run([sys.executable, "-m", "cimfast.export", out, str(tmp_path / "e.safetensors")],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "was refused" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_train(["--ds_config", runs["cfg"], "--output_dir", out, "--resume", "auto", "--max_steps", "7"])
    assert r.returncode == 2 and "was refused" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not mark.exists()
    assert not (tmp_path / "e.safetensors").exists()


def test_two_nodes_match_one_node_with_two_ranks(runs, tmp_path):
    """2 nodes x 1 rank (two torchrun agents meeting at a c10d rendezvous on
    127.0.0.1, as on a cluster) give the losses of 1 node x 2 ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "nodes")
    cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "cimfast-test",
           os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", runs["cfg"], "--output_dir", out,
           "--max_steps", "3"]
    nodes = [subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert "2 rank(s)" in "".join(logs)
    a, b = losses(runs["two"]), losses(out)
    assert sorted(b) == [1, 2, 3]
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_pictures_run_eagerly_beside_the_compiled_step(tmp_path):
    """The picture calls the model's forward, not the compiled module: a picture through the
    compiled step recompiled it (8 images, return_visuals) and crashed inductor on an H200.
    Here the compile backend refuses every graph: the picture must not reach it."""
    from cimfast import train
    from cimfast.config.cli import parse
    from cimfast.engine.data import build_dataset, fixed_batch
    from cimfast.engine.distributed import Place
    from cimfast.objective.cim import build_tokenizer

    cfg, run, ds_cfg, ds_path = parse(["--ds_config", os.path.join(ROOT, "configs", "ds_demo.json"),
                                       "--output_dir", str(tmp_path), "--knn_train_path", "", "--knn_val_path", ""])
    job = train.setup(cfg, run, ds_cfg, ds_path, build_tokenizer(cfg), Place(0, 1, torch.device("cpu")))

    def refuse(gm, example_inputs):
        raise RuntimeError("the compiled module was called")

    job.model.compile(backend=refuse)
    job.model.eval()
    with torch.no_grad():
        job.picture(job.model, str(tmp_path / "picture.png"))
        assert (tmp_path / "picture.png").stat().st_size > 0
        b = fixed_batch(build_dataset(cfg, run), 2)
        with pytest.raises(Exception, match="compiled module was called"):  # the refusal is armed
            job.model(b["images"], b["images_tok"], b["mask"], b["sample_key"])
