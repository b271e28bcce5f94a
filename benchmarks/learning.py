"""Does pre-training teach the enhancer something a user can see? Pre-trains
with a config (default: the quickstart's, ``configs/ds_demo.json``) once per
seed through ``cimfast/train.py``, then compares the enhancer's frozen
features before any update (the run's own random init, rebuilt from its seed)
and after the last step, by feature kind (ViT: ``mean``, the mean-pooled
patch tokens, and ``cls``, the [CLS] token; ResNet: ``pool``), with DINO's
k-NN and MAE's linear probe (``cimfast.evaluate``'s protocols) on a labelled
train and val set (default: the config's k-NN monitor sets, else the demo
digits). Prints, per seed, the k-NN monitor's own step-0 and final
``knn_top1`` and their gain (what the quickstart shows), then per feature
kind and protocol the mean and standard deviation over the seeds of random
init, pre-trained, and the gain.

    python benchmarks/learning.py --seeds 0 1 2 3 4
    python benchmarks/learning.py --seeds 0 1 2 -- --objective revdet

Arguments after ``--`` go to ``cimfast/train.py`` (``--max_steps``,
``--objective``, ``--data_path``, ``--crop_scale``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="benchmarks/learning.py", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to cimfast/train.py, e.g. -- --objective revdet")
    p.add_argument("--ds_config", default=os.path.join(ROOT, "configs", "ds_demo.json"),
                   help="the pre-training config (default: configs/ds_demo.json, the quickstart's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="run seeds (default: 0 1 2 3 4)")
    p.add_argument("--train_path", default=None,
                   help="labelled train folder (class subfolders), or demo (default: the config's knn_train_path, "
                        "else demo)")
    p.add_argument("--val_path", default=None, help="labelled val folder, or demo (default: as --train_path)")
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "learning"),
                   help="one output folder per seed, and learning.json (default: outputs/learning)")
    p.add_argument("--launcher", choices=("deepspeed", "python"), default="deepspeed",
                   help="deepspeed (as the README runs it; default) or python (one process, no launcher)")
    p.add_argument("--probe_epochs", type=int, default=90, help="linear probe epochs (default: 90, MAE's)")
    p.add_argument("--cache_dir", default=None, help="validation and demo cache (default: ~/.cache/cimfast)")
    a = p.parse_args(argv)
    a.train_args = train_args
    return a


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def pretrain(a, seed: int, knn_paths: tuple) -> str:
    """One run of cimfast/train.py with this seed; its output folder."""
    out = os.path.join(a.out, f"seed_{seed}")
    if a.launcher == "deepspeed":
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--master_port", free_port()]
    else:
        cmd = [sys.executable]
    cmd += [os.path.join(ROOT, "cimfast", "train.py"), "--ds_config", a.ds_config, "--seed", str(seed),
            "--output_dir", out, "--overwrite", "--no-progress", "--knn_train_path", knn_paths[0],
            "--knn_val_path", knn_paths[1], *a.train_args]
    if a.cache_dir:
        cmd += ["--cache_dir", a.cache_dir]
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"seed {seed}: cimfast/train.py exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return out


def monitor(out: str) -> dict:
    """The run's k-NN monitor (step 0, last record, gain) and its training time (steps only)."""
    from cimfast.engine.metrics import read_metrics

    recs = read_metrics(out)
    init = next(r["knn_top1_init"] for r in recs if "knn_top1_init" in r)
    last = [r for r in recs if "knn_top1" in r][-1]
    timed = [r for r in recs if "step_time" in r]
    prev, train_s = 0, 0.0
    for r in timed:  # each record's step_time is the mean over the steps since the previous record
        train_s, prev = train_s + r["step_time"] * (r["step"] - prev), r["step"]
    return {"knn_top1_init": init, "knn_top1": last["knn_top1"], "knn_top1_gain": last["knn_top1_gain"],
            "steps": last["step"], "train_seconds": train_s}


def enhancers(out: str, seed: int):
    """(random init, pre-trained) enhancers of a run: the init rebuilt as cimfast/train.py builds it."""
    import torch

    from cimfast.config.settings import Config, from_dict
    from cimfast.evaluation.loading import load_enhancer
    from cimfast.objective.cim import CIMModel, build_tokenizer

    with open(os.path.join(out, "config.json")) as f:
        settings = json.load(f)["cimfast"]
    names = set(Config.__dataclass_fields__)
    cfg = from_dict(Config, {k: v for k, v in settings.items() if k in names}).resolve()
    tokenizer = build_tokenizer(cfg)  # before the seed, as in cimfast/train.py (building it draws numbers)
    torch.manual_seed(seed)  # as cimfast/train.py, right before it builds the model
    init = CIMModel(cfg, tokenizer).enhancer
    return init, load_enhancer(out)[0], cfg.img_size


def evaluate(splits, enhancer, seed: int, probe_epochs: int) -> dict:
    """{kind: {knn, linear}} top-1 (%) of the frozen enhancer's features."""
    import torch

    from cimfast.evaluation.knn import knn_classify
    from cimfast.evaluation.probe import linear_probe

    f = splits.features(enhancer, torch.device("cpu"))
    (tr, ty), (va, vy) = f["train"], f["val"]
    return {kind: {"knn": knn_classify(tr[kind], ty, va[kind], vy)["top1"],
                   "linear": linear_probe(tr[kind], ty, va[kind], vy, epochs=probe_epochs,
                                          warmup_epochs=max(1, probe_epochs // 9), seed=seed)["top1"]}
            for kind in tr}


def spread(values: list) -> str:
    m = statistics.mean(values)
    return f"{m:.1f} ({statistics.stdev(values):.1f})" if len(values) > 1 else f"{m:.1f}"


def summary(rows: list) -> str:
    """The per-seed and per-kind Markdown tables."""
    lines = ["| seed | knn_top1_init | knn_top1 (last) | gain | training s |", "|---|---|---|---|---|"]
    for r in rows:
        m = r["monitor"]
        lines.append(f"| {r['seed']} | {m['knn_top1_init']:.1f} | {m['knn_top1']:.1f} | {m['knn_top1_gain']:+.1f} "
                     f"| {m['train_seconds']:.0f} |")
    gains = [r["monitor"]["knn_top1_gain"] for r in rows]
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    ratio = f"{statistics.mean(gains) / sd:.1f}" if sd > 0 else "n/a (one seed, or equal gains)"
    lines.append(f"| mean (std) | {spread([r['monitor']['knn_top1_init'] for r in rows])} | "
                 f"{spread([r['monitor']['knn_top1'] for r in rows])} | {spread(gains)} | "
                 f"{spread([r['monitor']['train_seconds'] for r in rows])} |")
    lines += ["", f"mean gain / std: {ratio}; smallest gain {min(gains):+.1f}", "",
              "| features | evaluation | random init | pre-trained | gain | smallest gain |", "|---|---|---|---|---|---|"]
    from cimfast.evaluation.knn import default_kind

    default = default_kind(rows[0]["init"])
    for kind in rows[0]["init"]:
        name = f"{kind} (default)" if kind == default else kind
        for proto in ("knn", "linear"):
            a = [r["init"][kind][proto] for r in rows]
            b = [r["trained"][kind][proto] for r in rows]
            g = [y - x for x, y in zip(a, b)]
            lines.append(f"| {name} | {'k-NN' if proto == 'knn' else 'linear probe'} top-1 | {spread(a)} | "
                         f"{spread(b)} | {spread(g)} | {min(g):+.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    from cimfast.config.cli import read_ds_config
    from cimfast.evaluation.knn import LabelledSplits
    from cimfast.evaluation.labelled import resolve_paths

    section = read_ds_config(a.ds_config).get("cimfast", {})
    train_path = a.train_path or section.get("knn_train_path") or "demo"
    val_path = a.val_path or ("demo" if train_path == "demo" else None)
    if val_path is None:
        sys.exit("--val_path: give the labelled val folder beside --train_path")
    paths = resolve_paths(train_path, val_path, a.cache_dir)
    os.makedirs(a.out, exist_ok=True)
    rows, splits = [], None
    for seed in a.seeds:
        t0 = time.time()
        out = pretrain(a, seed, (train_path, val_path))
        init, trained, size = enhancers(out, seed)
        if splits is None:  # decoded once, kept in memory
            splits = LabelledSplits(*paths, size, cache_dir=a.cache_dir, cache_bytes=2**31)
        row = {"seed": seed, "monitor": monitor(out), "init": evaluate(splits, init, seed, a.probe_epochs),
               "trained": evaluate(splits, trained, seed, a.probe_epochs), "wall_seconds": time.time() - t0}
        rows.append(row)
        m = row["monitor"]
        print(f"seed {seed}: knn_top1 {m['knn_top1_init']:.1f} -> {m['knn_top1']:.1f} (gain "
              f"{m['knn_top1_gain']:+.1f}), {m['steps']} steps, {m['train_seconds']:.0f} s training, "
              f"{row['wall_seconds']:.0f} s in all", flush=True)
    print(summary(rows))
    with open(os.path.join(a.out, "learning.json"), "w") as f:
        json.dump({"ds_config": a.ds_config, "train_args": a.train_args, "train_path": train_path,
                   "val_path": val_path, "launcher": a.launcher, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
