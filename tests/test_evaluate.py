"""Evaluation: k-NN and linear probe against references, the CLI, and the
metrics that show CIM working, against hand-computed values."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cimfast.config.settings import InputError
from cimfast.evaluation.knn import knn_classify
from cimfast.evaluation.labelled import labelled_files
from cimfast.evaluation.loading import load_enhancer
from cimfast.evaluation.probe import linear_probe
from cimfast.kernels.pixel_loss import window_normalize
from cimfast.objective.diagnostics import (
    CodeMarginal,
    ReplacedWatch,
    balanced_accuracy,
    code_counts,
    entropy_of_counts,
    trivial_accuracy,
)
from tests.labelled import make_labelled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def brute_force_knn(train, train_y, val, val_y, k, T):
    """DINO's weighted vote, one query at a time, with Python loops."""
    classes = int(max(train_y.max(), val_y.max())) + 1
    hits1 = hits5 = 0
    for v, y in zip(val, val_y):
        sims = [(float(F.cosine_similarity(v, t, dim=0)), int(c)) for t, c in zip(train, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for s, c in sims[:k]:
            votes[c] += torch.exp(torch.tensor(s / T, dtype=torch.float64)).item()
        order = sorted(range(classes), key=lambda c: -votes[c])
        hits1 += order[0] == int(y)
        hits5 += int(y) in order[:5]
    return {"top1": 100 * hits1 / len(val), "top5": 100 * hits5 / len(val)}


def test_knn_equals_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)
    train_y = torch.randint(0, 8, (120,), generator=g)
    val_y = torch.randint(0, 8, (40,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(120, 16, generator=g)
    val = centers[val_y] + 1.5 * torch.randn(40, 16, generator=g)
    for k, T in ((20, 0.07), (5, 0.5)):
        got = knn_classify(train, train_y, val, val_y, k, T, chunk=7)
        ref = brute_force_knn(train, train_y, val, val_y, k, T)
        assert got == pytest.approx(ref), (k, T)
        assert 20 < got["top1"] < 100 and got["top5"] > got["top1"]  # neither trivial nor perfect


def test_linear_probe_learns_a_linearly_separable_set_and_not_noise():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, generator=g)
    x = torch.randn(600, 32, generator=g) * 3 + 5  # offset and scale: the BatchNorm must handle them
    y = (x - 5).matmul(w).argmax(1)
    fit = linear_probe(x[:400], y[:400], x[:400], y[:400], epochs=30, warmup_epochs=3, batch=32, base_lr=1.0)
    assert fit["top1"] > 98  # separable: the probe fits it
    held = linear_probe(x[:400], y[:400], x[400:], y[400:], epochs=30, warmup_epochs=3, batch=32, base_lr=1.0)
    assert held["top1"] > 80
    noise = linear_probe(x[:400], torch.randint(0, 4, (400,), generator=g), x[400:],
                         torch.randint(0, 4, (200,), generator=g), epochs=30, warmup_epochs=3, batch=64)
    assert noise["top1"] < 40  # chance is 25 %


def test_labelled_folders_name_their_classes_and_refuse_flat_folders(tmp_path):
    make_labelled(tmp_path / "ok", classes=3, per_class=4)
    (tmp_path / "ok" / "class_1" / "broken.png").write_bytes(b"not a png")
    files, labels, classes = labelled_files(str(tmp_path / "ok"), cache_dir=str(tmp_path / "cache"))
    assert classes == ["class_0", "class_1", "class_2"] and len(files) == 12  # the broken file is left out
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    flat = tmp_path / "flat"
    flat.mkdir()
    (tmp_path / "ok" / "class_0" / "000.png").rename(flat / "a.png")
    with pytest.raises(InputError, match="no class subfolders"):
        labelled_files(str(flat))
    with pytest.raises(InputError, match="not a folder"):
        labelled_files(str(tmp_path / "missing"))


def test_metric_helpers_against_hand_computed_values():
    pred = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)
    target = torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool)
    # TPR 2/3, TNR 2/3 -> 2/3; a constant prediction scores 0.5 whatever the class balance
    assert balanced_accuracy(pred, target).item() == pytest.approx(2 / 3)
    assert balanced_accuracy(torch.ones(6, dtype=torch.bool), target).item() == pytest.approx(0.5)
    assert torch.isnan(balanced_accuracy(pred, torch.ones(6, dtype=torch.bool)))  # no negatives: undefined
    assert trivial_accuracy(torch.tensor([1.0, 1, 1, 0])).item() == pytest.approx(0.75)
    assert code_counts(torch.tensor([[2, 0], [2, 3]]), 5).tolist() == [1, 0, 2, 1, 0]
    assert entropy_of_counts(torch.tensor([1.0, 1, 2, 0])) == pytest.approx(-(2 * 0.25 * torch.log(torch.tensor(0.25)) + 0.5 * torch.log(torch.tensor(0.5))).item())
    assert entropy_of_counts(torch.tensor([0.0, 7, 0])) == pytest.approx(0.0)
    m = CodeMarginal(4, torch.device("cpu"))
    m.add(code_counts(torch.tensor([0, 1]), 4))
    m.add(code_counts(torch.tensor([2, 3]), 4))
    assert m.report(1)["gen_loss_trivial"] == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_replaced_watch_warns_once_on_a_long_stretch_only(caplog):
    caplog.set_level(logging.WARNING, logger="cimfast")
    w = ReplacedWatch(max_steps=100)
    assert [w.check(s, f) for s, f in ((10, 0.99), (20, 0.99), (30, 0.5), (40, 0.99))] == [None] * 4  # short
    msgs = [w.check(s, 0.995) for s in range(50, 100, 10)]  # near 1 since step 40: warns at 65+ (25 steps, 3 records)
    assert [m is not None for m in msgs] == [False, False, True, False, False]
    assert "near 1 since step 40" in msgs[2]
    w2 = ReplacedWatch(max_steps=100)
    assert [w2.check(s, 0.01) for s in (10, 20, 30, 40)][-1] is not None  # near 0 too
    assert len([r for r in caplog.records if "replaced_frac" in r.message]) == 2


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_the_step_reports_trivial_baselines(objective):
    import numpy as np

    from cimfast.config.settings import Config
    from cimfast.objective.cim import CIMModel
    from cimfast.objective.masking import BlockMaskGenerator
    from cimfast.tokenizer.model import TINY_SPEC, Tokenizer

    cfg = Config(preset="tiny", objective=objective, img_size=64, num_masked=6, min_block=2)
    cfg.resolve()
    model = CIMModel(cfg, Tokenizer(TINY_SPEC))
    images = torch.rand(3, 3, 64, 64)
    gen = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block)
    mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(3)]).reshape(3, -1))
    out = model(images, F.interpolate(images, size=cfg.tok_size), mask)
    assert out["code_counts"].shape == (512,) and out["code_counts"].sum() == 3 * cfg.num_masked
    if objective == "respix":
        target, _, _ = window_normalize(images, cfg.window, cfg.window_eps)
        assert out["enh_loss_trivial"].item() == pytest.approx((target ** 2).mean().item(), rel=1e-4)
    else:
        assert 0.0 <= out["det_bal_acc"].item() <= 1.0 or torch.isnan(out["det_bal_acc"])
        frac = out["replaced_frac"].item() * cfg.num_masked / cfg.grid ** 2  # replaced among all patches
        assert out["det_acc_trivial"].item() == pytest.approx(max(frac, 1 - frac))


def test_evaluate_cli_random_and_exported_give_the_same_features(tmp_path):
    """``--help``; k-NN of a random-init enhancer; the same weights exported and read back give the same numbers."""
    r = subprocess.run([sys.executable, "-m", "cimfast.evaluate", "knn", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=ENV)
    assert r.returncode == 0 and "--train_path" in r.stdout
    train = make_labelled(tmp_path / "train", per_class=10)
    val = make_labelled(tmp_path / "val", per_class=4, seed=1)
    enhancer, cfg = load_enhancer("random", "tiny", seed=3)
    from safetensors.torch import save_file

    path = str(tmp_path / "enh.safetensors")
    save_file(enhancer.timm_state_dict(), path, metadata={
        "config": json.dumps({k: cfg[k] for k in ("enhancer", "enhancer_dim", "enhancer_depth", "enhancer_heads",
                                                  "resnet_layers", "resnet_width", "objective")}),
        "img_size": str(cfg["img_size"]), "patch_size": str(cfg["patch_size"])})
    reports = []
    for model in ("random", path):
        out = str(tmp_path / f"{len(reports)}.json")
        r = subprocess.run([sys.executable, "-m", "cimfast.evaluate", "knn", "--model", model, "--seed", "3",
                            "--train_path", train, "--val_path", val, "--num_workers", "0", "--out", out,
                            "--cache_dir", str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT,
                           env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        reports.append(json.load(open(out)))
    assert reports[0]["results"] == reports[1]["results"]
    assert set(reports[0]["results"]) == {"mean", "cls"} and reports[0]["val_images"] == 12
    assert reports[0]["default_features"] == "mean"  # either objective: no loss reaches [CLS]
    top1 = reports[1]["results"]["mean"]["top1"]
    assert f"knn top-1 {top1:.1f} % with the mean features" in r.stderr, r.stderr[-2000:]
    assert reports[0]["results"]["mean"]["top1"] > 50  # the colours separate even for random features
    bad = subprocess.run([sys.executable, "-m", "cimfast.evaluate", "linear", "--model", str(tmp_path / "nope"),
                          "--train_path", train, "--val_path", val], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # --preset with a saved model would be ignored: it is refused
    bad = subprocess.run([sys.executable, "-m", "cimfast.evaluate", "knn", "--model", path, "--preset", "base",
                          "--train_path", train, "--val_path", val], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert bad.returncode == 2 and "--preset is for --model random" in bad.stderr, bad.stderr


def test_evaluate_under_the_deepspeed_launcher_matches_one_rank(tmp_path):
    """Two ranks each extract half the images (the last one padded); gathered, they give one rank's results."""
    from tests.test_signals import _free_port

    train = make_labelled(tmp_path / "train", per_class=7)  # 21 images: uneven shards
    val = make_labelled(tmp_path / "val", per_class=3, seed=1)
    args = ["knn", "--model", "random", "--seed", "1", "--k", "5", "--train_path", train, "--val_path", val,
            "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    one = subprocess.run([sys.executable, os.path.join(ROOT, "cimfast", "evaluate.py"), *args, "--out",
                          str(tmp_path / "one.json"), "--save_features", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                          "--master_port", _free_port(), os.path.join(ROOT, "cimfast", "evaluate.py"), *args, "--out",
                          str(tmp_path / "two.json"), "--save_features", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert b["ranks"] == 2 and b["train_images"] == 21 and a["results"] == b["results"]
    fa, fb = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for split, n in (("train", 21), ("val", 9)):  # same features, labels and order; no padding left in
        (feats_a, ya), (feats_b, yb) = fa[split], fb[split]
        assert len(ya) == n and torch.equal(ya, yb) and torch.equal(ya, torch.arange(n) // (n // 3))
        for kind in ("mean", "cls"):
            assert torch.allclose(feats_a[kind], feats_b[kind], atol=1e-5)


def test_lars_is_maes_update():
    """One LARS step by hand: momentum buffer = trust x |w| / |g| x g for matrices, g for vectors."""
    from cimfast.evaluation.probe import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # |g| = 2
    LARS([w, b], lr=10.0, trust_coefficient=0.001).step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0 - 10 * 0.001 * 5 / 2 * 2]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 10 * 0.5]))


def test_a_missing_folder_is_named_before_the_model_loads(tmp_path):
    """A missing train folder beside demo: the error names the folder, not the demo rule."""
    r = subprocess.run([sys.executable, "-m", "cimfast.evaluate", "knn", "--model", str(tmp_path / "no_model"),
                        "--train_path", str(tmp_path / "nope"), "--val_path", "demo"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--train_path {tmp_path / 'nope'} is not a folder" in r.stderr


def test_loss_plot_draws_each_loss_beside_its_baseline_and_knn_beside_step_0(tmp_path):
    from cimfast.engine.metrics import tensorboard_name
    from cimfast.engine.pictures import save_loss_plot

    records = [{"step": 0, "knn_top1_init": 40.0, "knn_top1_cls_init": 38.0}]
    records += [{"step": s, "loss": 7 - s / 10, "gen_loss": 6 - s / 10, "gen_loss_trivial": 6.0, "enh_loss": 0.8,
                 "enh_loss_trivial": 0.81} for s in range(1, 5)]
    records += [{"step": 4, "knn_top1": 45.0, "knn_top1_cls": 39.0, "knn_top1_gain": 5.0}]
    drawn = save_loss_plot(records, str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert drawn["gen_loss"] == ["gen_loss", "gen_loss_trivial"] and drawn["enh_loss"] == ["enh_loss", "enh_loss_trivial"]
    assert drawn["loss"] == ["loss"]
    assert drawn["k-NN top-1 (%)"] == ["knn_top1", "knn_top1_init", "knn_top1_cls", "knn_top1_cls_init"]
    assert "k-NN top-1 (%)" not in save_loss_plot(records[1:5], str(tmp_path / "no_knn.png"))
    revdet = [{"step": s, "loss": 5.0, "enh_loss": 0.5, "det_acc": 0.7, "det_acc_trivial": 0.6} for s in (1, 2)]
    drawn = save_loss_plot(revdet, str(tmp_path / "revdet.png"))
    assert drawn["det_acc"] == ["det_acc", "det_acc_trivial"] and drawn["enh_loss"] == ["enh_loss"]
    assert [tensorboard_name(k) for k in ("gen_loss", "gen_loss_trivial", "knn_top1", "knn_top1_init", "lr")] == \
        ["loss/gen_loss", "loss/gen_loss_trivial", "knn/top1", "knn/top1_init", "run/lr"]


@pytest.mark.parametrize("preset,kind", [("tiny", "mean"), ("tiny-resnet", "pool")])
def test_the_default_feature_kind_is_each_enhancers_pooled_features(preset, kind):
    """The monitor's knn_top1 and evaluate's headline: a ViT's mean-pooled patch tokens, a ResNet's pool."""
    from cimfast.evaluation.knn import default_kind

    enhancer, cfg = load_enhancer("random", preset, seed=0)
    with torch.no_grad():
        feats = enhancer.features(torch.randn(2, 3, cfg["img_size"], cfg["img_size"]))
    assert default_kind(feats) == kind and default_kind(list(feats)) == kind
    with pytest.raises(ValueError, match="no default feature kind"):
        default_kind(["cls"])


def test_the_closing_line_gives_each_top1_beside_its_gain_over_step_0():
    from cimfast.engine.metrics import closing_summary

    records = [{"step": 0, "knn_top1_init": 55.1, "knn_top1_cls_init": 52.0},
               {"step": 10, "loss": 4.9},
               {"step": 800, "knn_top1": 66.44, "knn_top5": 97.3, "knn_top1_cls": 54.2, "knn_top1_gain": 11.34,
                "knn_top5_gain": 2.0, "knn_top1_cls_gain": 2.2, "eval_seconds": 2.0},
               {"step": 800, "loss": 4.8}]
    assert closing_summary(records) == "knn_top1 66.4 (+11.3 over step 0), knn_top1_cls 54.2 (+2.2 over step 0)"
    assert closing_summary(records[:2]) == ""  # no gain yet (or no monitor): the line says nothing of it
