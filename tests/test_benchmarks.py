"""The benchmark scripts run (tiny shapes): they must not rot between GPU sessions."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_benchmark_runs_both_paths(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--preset", "tiny",
                        "--batch", "2", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fast / plain" in r.stdout
    res = json.load(open(tmp_path / "e2e_tiny.json"))
    assert [x["path"] for x in res["results"]] == ["plain", "fast"]
    assert all(x["img_per_s"] > 0 and set(x["split_s"]) == {"tokenizer", "generator", "enhancer"}
               for x in res["results"])
    assert res["flops"]["total"] > res["flops"]["tokenizer"] > 0


def test_gpu_check_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_memory_benchmark_runs():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpointing" in r.stdout


def test_tokenizer_forms_benchmark_runs_both_forms_and_every_switch(tmp_path):
    bench = os.path.join(ROOT, "benchmarks", "bench_tokenizer_forms.py")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, bench, "--spec", "tiny", "--batch", "2", "--size", "32", "--repeats", "1",
                        "--out", str(tmp_path / "forms.json")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["part"]: row for row in json.load(open(tmp_path / "forms.json"))["rows"]}
    assert rows["decode"]["flop_ratio"] < 0.9 and rows["encode"]["flop_ratio"] == 1.0  # the upsample reorder
    assert all(row["ms_official"] > 0 and row["ms_rewritten"] > 0 for row in rows.values())
    r = subprocess.run([sys.executable, bench, "--switches", "--spec", "tiny", "--batch", "2", "--size", "32",
                        "--repeats", "1", "--out", str(tmp_path / "switches.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.load(open(tmp_path / "switches.json"))["rows"]
    assert [row["switch"] for row in rows] == ["fast path", "cudnn_benchmark", "tokenizer_io_bf16",
                                               "tokenizer_fp8_logits"]  # tokenizer_fuse needs --compile
    assert all(0.5 < row["token_agreement_vs_fp32"] <= 1.0 and row["ms"] > 0 for row in rows)
