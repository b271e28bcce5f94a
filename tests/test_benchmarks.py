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


def test_learning_benchmark_explains_itself_and_runs_two_seeds(tmp_path):
    from tests.labelled import make_labelled

    bench = os.path.join(ROOT, "benchmarks", "learning.py")
    r = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--seeds" in r.stdout and "linear probe" in r.stdout, r.stderr[-2000:]
    train, val = make_labelled(tmp_path / "train", classes=3, per_class=8), make_labelled(tmp_path / "val", seed=1)
    r = subprocess.run([sys.executable, bench, "--seeds", "0", "1", "--launcher", "python", "--probe_epochs", "2",
                        "--train_path", train, "--val_path", val, "--out", str(tmp_path / "out"), "--",
                        "--data_path", train, "--max_steps", "2", "--image_interval", "0", "--num_workers", "0"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.load(open(tmp_path / "out" / "learning.json"))
    assert [row["seed"] for row in res["rows"]] == [0, 1]
    for row in res["rows"]:  # the rebuilt random init is the run's own step 0: the same k-NN as its monitor
        assert abs(row["init"]["mean"]["knn"] - row["monitor"]["knn_top1_init"]) < 1e-3, row
        assert set(row["init"]) == set(row["trained"]) == {"mean", "cls"}
        assert row["monitor"]["steps"] == 2 and row["monitor"]["train_seconds"] > 0
    assert "| mean (default) | k-NN top-1 |" in r.stdout and "| cls | linear probe top-1 |" in r.stdout
