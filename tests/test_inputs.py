"""Mistakes a user makes at the start: each is one line that names the problem
and what to do, exit code 2, before DeepSpeed starts and before anything is
written. Re-runs into a folder with checkpoints refuse; --resume auto says
what it found; --debug shows the traceback."""
import json
import os
import socket
import subprocess
import sys

import pytest

from cimfast.tokenizer.model import TINY_SPEC
from tests.dalle_format import write_official

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def _train(args, launcher=None, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "cimfast", "train.py")] if launcher is None else launcher + [
        os.path.join(ROOT, "cimfast", "train.py")]
    return subprocess.run(cmd + ["--no-progress", "--num_workers", "0"] + args, env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(r, *words):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    lines = [l for l in out.splitlines() if l.startswith("cimfast:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _bad_tokenizer(tmp):
    d = tmp / "tok"
    d.mkdir()
    (d / "encoder.pkl").write_bytes(b"not a pickle")
    (d / "decoder.pkl").write_bytes(b"")
    return str(d)


def _swapped_tokenizer(tmp):
    d = tmp / "swapped"
    d.mkdir()
    write_official(TINY_SPEC, d)
    os.replace(d / "encoder.pkl", d / "x")
    os.replace(d / "decoder.pkl", d / "encoder.pkl")
    os.replace(d / "x", d / "decoder.pkl")
    return str(d)


def _demo_config_with(tmp, key):
    """The demo config with one misspelled key: "zero_optimisation" renames DeepSpeed's section,
    "cimfast.windw" adds a misspelled key to cimfast's."""
    cfg = json.load(open(os.path.join(ROOT, "configs", "ds_demo.json")))
    if key.startswith("cimfast."):
        cfg["cimfast"][key.split(".", 1)[1]] = 9
    else:
        cfg[key] = cfg.pop("zero_optimization")
    path = tmp / "typo.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_unknown_deepspeed_keys_warn_and_close_ones_are_refused(caplog):
    """DeepSpeed ignores top-level keys it does not know: a likely typo is an error, another key a warning."""
    import logging

    from cimfast.config.cli import check_ds_keys
    from cimfast.config.settings import ConfigError

    for typo, meant in (("train_batch_sizee", "train_batch_size"), ("gradient_clip", "gradient_clipping")):
        with pytest.raises(ConfigError, match=f"did you mean {meant}"):
            check_ds_keys({typo: 1})
    with caplog.at_level(logging.WARNING, logger="cimfast"):
        check_ds_keys({"train_batch_size": 8, "my_notes": "x"})
    assert [r.getMessage() for r in caplog.records if "my_notes" in r.getMessage()]
    shipped = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".json"))
    for name in shipped:  # the shipped configs: nothing unknown
        cfg = json.load(open(os.path.join(ROOT, "configs", name)))
        cfg.pop("cimfast", None)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cimfast"):
            check_ds_keys(cfg)
        assert not [r for r in caplog.records if "not a setting" in r.getMessage()], name


CASES = {
    "missing data path": (lambda t: ["--data_path", str(t / "nope")], ("does not exist", "--data_path")),
    "empty data folder": (lambda t: (t / "empty").mkdir() or ["--data_path", str(t / "empty")], ("no images",)),
    "no tokenizer for a DALL-E preset": (lambda t: ["--preset", "base"], ("--tokenizer_path", "encoder.pkl")),
    "unreadable tokenizer files": (lambda t: ["--tokenizer_path", _bad_tokenizer(t)], ("could not be read",)),
    "swapped tokenizer files": (lambda t: ["--tokenizer_path", _swapped_tokenizer(t)], ("swapped",)),
    "tokenizer pin that does not match": (
        lambda t: ["--tokenizer_path", _swapped_tokenizer(t), "--encoder_sha256", "0" * 64], ("pinned",)),
    "resume from a folder that is no checkpoint": (lambda t: ["--resume", str(t)], ("--resume", "checkpoint")),
    "bad value": (lambda t: ["--window", "1"], ("window",)),
    "misspelled DeepSpeed key": (lambda t: ["--ds_config", _demo_config_with(t, "zero_optimisation")],
                                 ("ds_config.zero_optimisation", "did you mean zero_optimization")),
    "misspelled cimfast key": (lambda t: ["--ds_config", _demo_config_with(t, "cimfast.windw")],
                               ("cimfast.windw", "did you mean window")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_errors_are_one_line_with_exit_code_2_and_write_nothing(tmp_path, case):
    make, words = CASES[case]
    out = tmp_path / "out"
    r = _train(make(tmp_path) + ["--output_dir", str(out)])
    _one_line(r, *words)
    assert not out.exists()  # nothing written, nothing started


def test_a_misspelt_optimizer_parameter_is_one_line(tmp_path):
    """DeepSpeed hands the optimizer's params to its class: a typo was a TypeError traceback."""
    with open(os.path.join(ROOT, "configs", "ds_demo.json")) as f:
        cfg = json.load(f)
    cfg["optimizer"]["params"]["weight_decy"] = cfg["optimizer"]["params"].pop("weight_decay")
    path = tmp_path / "opt.json"
    path.write_text(json.dumps(cfg))
    r = _train(["--ds_config", str(path), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    _one_line(r, "weight_decy", "optimizer")


def test_debug_shows_the_traceback(tmp_path):
    r = _train(["--data_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr and "does not exist" in r.stderr


def test_a_rerun_into_a_folder_with_checkpoints_refuses_and_resume_auto_says_what_it_found(tmp_path):
    out = str(tmp_path / "out")
    r = _train(["--output_dir", out, "--resume", "auto", "--max_steps", "1"])
    assert r.returncode == 0 and "--resume auto: no checkpoint" in r.stderr, r.stderr[-2000:]
    r = _train(["--output_dir", out, "--max_steps", "2"])
    _one_line(r, "holds checkpoints", "--resume auto", "--overwrite", "--output_dir")
    r = _train(["--output_dir", out, "--max_steps", "2", "--resume", "auto"])
    assert r.returncode == 0 and "continuing from" in r.stderr and "step_00000001" in r.stderr, r.stderr[-2000:]
    # the run was planned for 1 step: a longer one says its schedule is redrawn
    assert "planned for 1 steps and now runs to 2" in r.stderr, r.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        before = f.read()
    written = os.stat(os.path.join(out, "config.json")).st_mtime_ns
    r = _train(["--output_dir", out, "--max_steps", "2", "--resume", "auto"])  # finished: nothing to do
    assert r.returncode == 0 and "nothing left to train" in r.stderr, r.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert f.read() == before  # no second end record, no second evaluation
    assert os.stat(os.path.join(out, "config.json")).st_mtime_ns == written  # nothing set up or written
    # fine-tuning and tokenizer training neither resume nor overwrite a pre-training folder
    for script in ("finetune.py", "tokenizer_train.py"):
        for extra in ([], ["--overwrite"], ["--resume", "auto"]):
            r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", script), "--output_dir", out, *extra],
                               env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
            _one_line(r, "holds the checkpoints of pre-training", "another --output_dir")
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "finetune.py"), "--resume", ckpt,
                        "--output_dir", str(tmp_path / "ft")], env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    _one_line(r, f"--resume {ckpt} is a checkpoint of pre-training", "not of fine-tuning")
    stale = os.path.join(out, "picture_step00000099.png")
    open(stale, "wb").close()
    r = _train(["--output_dir", out, "--max_steps", "1", "--overwrite"])
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(l)["step"] for l in f if '"loss"' in l] == [1]  # the old run's metrics are gone
    assert not os.path.exists(stale)  # and its pictures


def test_a_busy_port_under_the_deepspeed_launcher(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _train(["--output_dir", str(tmp_path / "out")],
                   launcher=[os.path.join(BIN, "deepspeed"), "--num_gpus", "1", "--master_port", str(port)])
    line = _one_line(r, str(port), "--master_port")
    assert "in use" in line
    assert not (tmp_path / "out").exists()


def test_a_script_that_raises_exits_at_once_with_its_traceback():
    """The entry scripts end through run_and_exit: a run that raised on an H200 sat 40 s after its
    traceback (until killed), holding the GPU. A thread that never ends must not keep it alive."""
    code = ("import threading, time\n"
            "from cimfast.config.preflight import run_and_exit\n"
            "threading.Thread(target=time.sleep, args=(120,)).start()\n"
            "def main():\n"
            "    raise RuntimeError('inductor fell over')\n"
            "run_and_exit(main)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "RuntimeError: inductor fell over" in r.stderr
    ok = subprocess.run([sys.executable, "-c", code.replace("raise RuntimeError('inductor fell over')", "return 0")],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("body, code, err", [
    ("return None", 0, ""), ("return 2", 2, ""), ("raise SystemExit", 0, ""), ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit('cimfast: bad input')", 1, "cimfast: bad input"), ("raise KeyboardInterrupt", 130, "")])
def test_run_and_exit_keeps_pythons_exit_codes(body, code, err):
    src = f"from cimfast.config.preflight import run_and_exit\ndef main():\n    {body}\nrun_and_exit(main)\n"
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == code, r.stderr
    assert err in r.stderr and ("Traceback" not in r.stderr)


def test_console_scripts_exit_through_run_and_exit():
    """setup.py's console scripts name each module's cli(), which ends through run_and_exit."""
    import importlib
    import inspect
    import re

    setup = open(os.path.join(ROOT, "setup.py")).read()
    scripts = dict(re.findall(r'"(cimfast-\w+)=([\w.]+:\w+)"', setup))
    for name in ("cimfast-train", "cimfast-finetune", "cimfast-evaluate"):
        module, func = scripts[name].split(":")
        assert func == "cli", name
        assert "run_and_exit(main)" in inspect.getsource(getattr(importlib.import_module(module), func))
