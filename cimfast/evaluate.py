"""Measure what pre-training learned: k-NN and linear probe on the frozen enhancer.

    python -m cimfast.evaluate knn --model outputs/cim-demo --train_path demo --val_path demo
    python -m cimfast.evaluate linear --model enhancer.safetensors --train_path /data/train --val_path /data/val
    deepspeed cimfast/evaluate.py knn --model ... (feature extraction is sharded over the ranks)

``--model``: a checkpoint folder, an output directory (its latest
checkpoint), a file written by ``python -m cimfast.export``, or ``random``
(a freshly initialized enhancer of ``--preset``: the baseline to beat).
``--train_path`` / ``--val_path``: folders with one subfolder of images per
class (validated like pre-training data: bad files are left out and
counted), or ``demo``: scikit-learn's handwritten digits (1,797 images, 10
classes; 1,347 train and 450 val), written once as PNG files.

Features (every kind is reported): ViT: ``mean``, the mean of the patch
tokens after the final norm, and ``cls``, the [CLS] token after it; ResNet:
``pool``, the last stage globally average-pooled. ``mean`` (ViT) and
``pool`` (ResNet) are the default with either objective, named in the
report (``default_features``) and in its last line: neither ResPix nor
RevDet puts a loss on [CLS]. Images are resized so the
shorter side is ``img_size / 0.875`` and centre-cropped to ``img_size``
(DINO's and MAE's evaluation transform), normalized with ImageNet's mean
and standard deviation, as in pre-training.

k-NN: DINO's weighted k-NN (Caron et al. 2021, ``eval_knn.py``): cosine
similarity of L2-normalized features, the k = 20 nearest training images
vote with weight exp(similarity / 0.07).

Linear probe: MAE's (He et al. 2022, appendix A.2, and its ``main_linprobe.py``):
BatchNorm without affine parameters, then a linear layer (weights drawn
with std 0.01), base learning rate 0.1 scaled by batch / 256, momentum 0.9,
no weight decay, 90 epochs with 10 of linear warmup and a cosine schedule.
It trains on cached features (MAE augments with random resized crops and
flips). MAE's optimizer is LARS (trust coefficient 0.001) at batch 16,384,
an lr of 6.4: ``--optimizer lars --batch_size 16384`` is that recipe. At
small batches LARS' steps (0.001 x |w| x lr) barely move the head (on a
separable toy set: 35 % after 360 steps against 98 % for SGD), so the
default is SGD with momentum and batch 256, the same base lr.

The comparison runs on rank 0, on the device; the features are extracted
on every rank and gathered.
"""
from __future__ import annotations

import argparse
import json
import logging

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

import torch

from cimfast.config.cli import Parser
from cimfast.config.preflight import guarded, run_and_exit
from cimfast.config.settings import InputError
from cimfast.engine.distributed import finish, init_distributed, setup_logging
from cimfast.evaluation.knn import LabelledSplits, default_kind, knn_classify
from cimfast.evaluation.labelled import resolve_paths
from cimfast.evaluation.loading import load_enhancer
from cimfast.evaluation.probe import linear_probe

log = logging.getLogger("cimfast")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cimfast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    sub = p.add_subparsers(dest="protocol", required=True)
    for name, what in (("knn", "weighted k-NN (DINO)"), ("linear", "linear probe (MAE), on cached features")):
        s = sub.add_parser(name, help=what, description=f"{what} on the frozen enhancer's features.")
        s.add_argument("--model", required=True,
                       help="checkpoint folder, output directory, exported .safetensors, or random")
        s.add_argument("--preset", default=None, help="with --model random: whose enhancer (default: tiny)")
        s.add_argument("--train_path", required=True, help="labelled train folder (class subfolders), or demo")
        s.add_argument("--val_path", required=True, help="labelled val folder (class subfolders), or demo")
        s.add_argument("--num_workers", type=int, default=2, help="decoding workers (default: 2)")
        s.add_argument("--cache_dir", default=None, help="validation and demo cache (default: ~/.cache/cimfast)")
        s.add_argument("--seed", type=int, default=0, help="random init and probe seed (default: 0)")
        s.add_argument("--out", default=None, help="also write the results to this JSON file")
        s.add_argument("--save_features", default=None,
                       help="also save the gathered features and labels (torch.save) to this file")
        s.add_argument("--debug", action="store_true", help="tracebacks for input errors")
        s.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "knn":
            s.add_argument("--k", type=int, default=20, help="neighbours (default: 20, DINO)")
            s.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default: 0.07, DINO)")
        else:
            s.add_argument("--epochs", type=int, default=90, help="epochs (default: 90, MAE)")
            s.add_argument("--warmup_epochs", type=int, default=10, help="linear warmup epochs (default: 10, MAE)")
            s.add_argument("--lr", type=float, default=0.1, help="base lr, scaled by batch/256 (default: 0.1, MAE)")
            s.add_argument("--batch_size", type=int, default=256, help="probe batch (default: 256; MAE: 16384)")
            s.add_argument("--weight_decay", type=float, default=0.0, help="(default: 0, MAE)")
            s.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd",
                           help="sgd (momentum 0.9; default) or lars (MAE's, for batches of 16384)")
    return p


def evaluate(a: argparse.Namespace) -> int:
    if a.protocol == "knn" and (a.k < 1 or a.temperature <= 0):
        raise InputError("--k must be positive and --temperature above 0")
    if a.protocol == "linear" and (a.epochs < 1 or a.batch_size < 1 or a.lr <= 0):
        raise InputError("--epochs, --batch_size and --lr must be positive")
    if a.preset is not None and a.model != "random":
        raise InputError(f"--preset is for --model random: {a.model} carries its own architecture")
    train_path, val_path = resolve_paths(a.train_path, a.val_path, a.cache_dir)  # before the model loads
    enhancer, cfg = load_enhancer(a.model, a.preset or "tiny", a.seed)
    place = init_distributed()
    rank, world, device = place.rank, place.world, place.device
    splits = LabelledSplits(train_path, val_path, cfg["img_size"], rank, world, a.cache_dir, a.num_workers)
    enhancer.to(device)
    feats = splits.features(enhancer, device)
    if rank == 0:  # the comparison on one rank, on the device
        (tr, ty), (va, vy) = feats["train"], feats["val"]
        if a.save_features:
            torch.save({"train": ({k: v.cpu() for k, v in tr.items()}, ty.cpu()),
                        "val": ({k: v.cpu() for k, v in va.items()}, vy.cpu()), "classes": splits.classes},
                       a.save_features)
        if a.protocol == "knn":
            results = {kind: knn_classify(tr[kind], ty, va[kind], vy, a.k, a.temperature) for kind in tr}
            settings = {"k": a.k, "temperature": a.temperature}
        else:
            results = {kind: linear_probe(tr[kind], ty, va[kind], vy, epochs=a.epochs, warmup_epochs=a.warmup_epochs,
                                          base_lr=a.lr, batch=a.batch_size, weight_decay=a.weight_decay,
                                          seed=a.seed, optimizer=a.optimizer) for kind in tr}
            settings = {"optimizer": a.optimizer, "epochs": a.epochs, "warmup_epochs": a.warmup_epochs,
                        "base_lr": a.lr, "batch_size": a.batch_size, "weight_decay": a.weight_decay}
        kind = default_kind(results)
        report = {"protocol": a.protocol, "model": cfg["model"], "train_images": splits.sizes["train"],
                  "val_images": splits.sizes["val"], "classes": len(splits.classes), "settings": settings,
                  "default_features": kind, "results": results, "ranks": world}
        print(json.dumps(report, indent=1))
        log.info("%s top-1 %.1f %% with the %s features (the default with either objective)", a.protocol,
                 results[kind]["top1"], kind)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
    finish()
    return 0


def main(argv=None) -> int:
    setup_logging()
    a = build_parser().parse_args(argv)
    return guarded(lambda: evaluate(a), argv)


def cli() -> None:
    """The script's and the console script cimfast-evaluate's exit (see run_and_exit)."""

    run_and_exit(main)


if __name__ == "__main__":
    cli()
