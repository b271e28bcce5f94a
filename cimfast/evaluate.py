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
``pool``, the last stage globally average-pooled. Images are resized so the
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
import math
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace
from typing import Optional

if __name__ == "__main__" and not __package__:
    import _script_path  # noqa: F401  (sys.path set-up for running as a script)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cimfast.cli import Parser
from cimfast.config import InputError

log = logging.getLogger("cimfast")
EVAL_CROP = 0.875  # resize to size / 0.875, centre crop (224 from 256)


def demo_digits(split: str, cache_dir: Optional[str] = None) -> str:
    """scikit-learn's digits (8 x 8, 17 grey levels) written once as 64 x 64
    PNG files in class folders; every 4th image is in ``val``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from cimfast.pipelines.demo import default_cache_dir

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    root = os.path.join(cache_dir or default_cache_dir(), "demo-digits", split)
    if os.path.isdir(root):
        return root
    # written into a private folder and renamed into place: ranks that race here
    # never see a half-written set (the loser of the rename drops its copy)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=os.path.dirname(root))
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        if (i % 4 == 0) != (split == "val"):
            continue
        os.makedirs(os.path.join(tmp, str(y)), exist_ok=True)
        a = np.repeat((img * (255 / 16)).round().astype(np.uint8)[:, :, None], 3, axis=2)
        Image.fromarray(a).resize((64, 64), Image.BILINEAR).save(os.path.join(tmp, str(y), f"{i:04d}.png"))
    try:
        os.rename(tmp, root)
    except OSError:  # another rank was first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def labelled_files(path: str, cache_dir: Optional[str] = None) -> tuple[list, list, list]:
    """(files, labels, class names) of a folder with one subfolder per class
    (``demo``: the digits); bad files are left out and counted."""
    from cimfast.pipelines.validate import validate

    if path in ("demo", "demo:train", "demo:val"):
        raise InputError("pass demo for both --train_path and --val_path (the train and val digits)")
    if not os.path.isdir(path):
        raise InputError(f"{path} is not a folder (one subfolder of images per class expected)")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise InputError(f"{path} has no class subfolders (one subfolder of images per class expected)")
    try:
        v = validate(path, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    root = os.path.abspath(path)
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for f in v.files:
        top = os.path.relpath(f, root).split(os.sep)[0]
        if top in index:
            files.append(f)
            labels.append(index[top])
    if v.summary["bad"]:
        log.warning("%s: %d of %d files left out (not decodable); see %s", path, v.summary["bad"],
                    v.summary["total"], os.path.splitext(v.clean_list)[0] + ".summary.json")
    if not files:
        raise InputError(f"{path}: no usable images in its class subfolders")
    return files, labels, classes


def resolve_paths(train_path: str, val_path: str, cache_dir: Optional[str] = None) -> tuple[str, str]:
    """The two labelled folders (``demo``: the digits, written once into the cache); a missing
    folder is named before anything is loaded."""
    for flag, path in (("--train_path", train_path), ("--val_path", val_path)):
        if path != "demo" and not os.path.isdir(path):
            raise InputError(f"{flag} {path} is not a folder: give one with a subfolder of images per class, "
                             "or demo")
    if (train_path == "demo") != (val_path == "demo"):
        raise InputError("--train_path and --val_path: demo must be given for both or neither")
    if train_path == "demo":
        return demo_digits("train", cache_dir), demo_digits("val", cache_dir)
    return train_path, val_path


def eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: shorter side to size / 0.875, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    img = TF.resize(img, int(round(size / EVAL_CROP)), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(img, [size, size])


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, files: list, labels: list, size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from cimfast.pipelines.datasets import decode_file

        return eval_view(decode_file(self.files[i]), self.size), self.labels[i]


def shard(n: int, rank: int, world: int) -> tuple[list, torch.Tensor]:
    """This rank's share of ``n`` items (every ``world``-th, padded with the last
    item to equal length on every rank) and their global indices (-1: padding)."""
    idx = [rank + j * world for j in range(math.ceil(n / world))]
    return [min(i, n - 1) for i in idx], torch.tensor([i if i < n else -1 for i in idx])


class ViewSource:
    """This rank's share of a labelled set as uint8 evaluation views: decoded
    once and kept in memory when they fit ``cache_bytes`` (the k-NN monitor's
    small sets), else decoded again at each pass (a one-off evaluation)."""

    def __init__(self, files: list, labels: list, size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 cache_bytes: int = 0):
        picks, self.index = shard(len(files), rank, world)
        self.labels = torch.tensor([labels[i] for i in picks])
        self.data = torch.utils.data.Subset(LabelledImages(files, labels, size), picks)
        self.num_workers, self.cached = num_workers, None
        if len(picks) * 3 * size * size <= cache_bytes:
            self.cached = torch.cat([v for v, _ in self.batches()])

    def batches(self, batch: int = 64):
        if self.cached is not None:
            yield from ((self.cached[i:i + batch], None) for i in range(0, len(self.cached), batch))
            return
        yield from torch.utils.data.DataLoader(self.data, batch_size=batch, num_workers=self.num_workers)


def normalized(views: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 views -> ImageNet-normalized ``dtype`` on ``device`` (as the enhancer saw in pre-training)."""
    from cimfast.cim import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((views.to(device).float() / 255 - mean) / std).to(dtype)


@torch.no_grad()
def extract(enhancer: nn.Module, source: ViewSource, device: torch.device) -> dict:
    """Features (float32, on ``device``) of this rank's views, the enhancer in eval mode."""
    was = enhancer.training
    enhancer.eval()
    dtype = next(enhancer.parameters()).dtype
    out: dict = {}
    for views, _ in source.batches():
        for k, v in enhancer.features(normalized(views, device, dtype)).items():
            out.setdefault(k, []).append(v.float())
    enhancer.train(was)
    return {k: torch.cat(v) for k, v in out.items()}


def gather(feats: dict, labels: torch.Tensor, index: torch.Tensor, world: int, device: torch.device):
    """Every rank's share, padding dropped, in the original order (on every rank, on ``device``)."""
    ids = torch.stack([labels, index], 1).to(device)
    if world > 1:
        parts = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(parts, ids)
        ids = torch.cat(parts)
        gathered = {}
        for k in sorted(feats):
            parts = [torch.empty_like(feats[k]) for _ in range(world)]
            dist.all_gather(parts, feats[k].contiguous())
            gathered[k] = torch.cat(parts)
        feats = gathered
    keep = ids[:, 1] >= 0
    order = ids[keep, 1].argsort()
    return {k: v[keep][order] for k, v in feats.items()}, ids[keep, 0][order]


def knn_classify(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 256) -> dict:
    """DINO's weighted k-NN: top-1 and top-5 accuracy (%) of ``val`` (on the features' device)."""
    train, val = F.normalize(train.float(), dim=1), F.normalize(val.float(), dim=1)
    classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(train))
    hits = torch.zeros(2, device=val.device)
    for i in range(0, len(val), chunk):
        sim, nn_idx = (val[i:i + chunk] @ train.t()).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(sim), classes, device=val.device).scatter_add_(1, train_y[nn_idx], weights)
        pred = votes.argsort(1, descending=True)
        y = val_y[i:i + chunk, None]
        hits += torch.stack([(pred[:, :1] == y).any(1).sum(), (pred[:, :min(5, classes)] == y).any(1).sum()])
    top1, top5 = (100 * hits / len(val)).tolist()
    return {"top1": top1, "top5": top5}


class LARS(torch.optim.Optimizer):
    """MAE's LARS (facebookresearch/mae ``util/lars.py``): SGD with momentum
    whose update of each matrix is scaled by trust_coefficient x |w| / |update|
    (1-D parameters: plain SGD with momentum)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w, u = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(w)
                    dp = dp.mul(torch.where(w > 0, torch.where(u > 0, g["trust_coefficient"] * w / u, one), one))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def linear_probe(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor,
                 epochs: int = 90, warmup_epochs: int = 10, base_lr: float = 0.1, batch: int = 256,
                 weight_decay: float = 0.0, seed: int = 0, optimizer: str = "sgd") -> dict:
    """MAE's linear probe on cached features (see the module's text): top-1/top-5 (%) on ``val``."""
    device = train.device
    g = torch.Generator().manual_seed(seed)
    classes = int(max(train_y.max(), val_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6), nn.Linear(train.shape[1], classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)  # MAE's head init
    nn.init.zeros_(head[1].bias)
    head.to(device)
    batch = min(batch, len(train))
    lr = base_lr * batch / 256
    if optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    per_epoch = len(train) // batch
    total, warm = epochs * per_epoch, warmup_epochs * per_epoch
    for step in range(total):  # MAE's per-iteration schedule: linear warmup, then half-cycle cosine
        if step % per_epoch == 0:
            order = torch.randperm(len(train), generator=g).to(device)
        scale = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        b = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        loss = F.cross_entropy(head(train[b].float()), train_y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(val.float()).argsort(1, descending=True)
    y = val_y[:, None]
    top1, top5 = (100 * torch.stack([(pred[:, :1] == y).any(1).float().mean(),
                                     (pred[:, :min(5, classes)] == y).any(1).float().mean()])).tolist()
    return {"top1": top1, "top5": top5}


class LabelledSplits:
    """A labelled train and val set, this rank's share of each (kept in memory
    up to ``cache_bytes``), whose features are compared with k-NN or a linear
    probe; the comparison runs on rank 0, on the device."""

    def __init__(self, train_path: str, val_path: str, size: int, rank: int = 0, world: int = 1,
                 cache_dir: Optional[str] = None, num_workers: int = 0, cache_bytes: int = 0):
        train_path, val_path = resolve_paths(train_path, val_path, cache_dir)
        self.rank, self.world = rank, world
        self.splits, self.sizes = {}, {}
        for name, path in (("train", train_path), ("val", val_path)):
            files, labels, classes = labelled_files(path, cache_dir)
            self.splits[name] = ViewSource(files, labels, size, rank, world, num_workers, cache_bytes)
            self.sizes[name] = len(files)
            if name == "train":
                self.classes = classes
            elif classes != self.classes:
                raise InputError(f"{val_path}: its class folders differ from those of {train_path}")

    def features(self, enhancer: nn.Module, device: torch.device) -> dict:
        """{split: (features by kind, labels)}, gathered on every rank."""
        return {name: gather(extract(enhancer, src, device), src.labels, src.index, self.world, device)
                for name, src in self.splits.items()}

    def knn(self, enhancer: nn.Module, device: torch.device, k: int = 20, temperature: float = 0.07) -> dict:
        """{feature kind: top-1/top-5} on rank 0 ({} on the others)."""
        f = self.features(enhancer, device)
        if self.rank != 0:
            return {}
        (tr, ty), (va, vy) = f["train"], f["val"]
        return {kind: knn_classify(tr[kind], ty, va[kind], vy, k, temperature) for kind in tr}


def load_enhancer(model: str, preset: str = "tiny", seed: int = 0) -> tuple[nn.Module, dict]:
    """The enhancer of a checkpoint, an output directory, an exported file or
    ``random`` (``preset``'s, freshly initialized), and its settings."""
    from cimfast import checkpoint
    from cimfast.cim import build_enhancer
    from cimfast.config import Config

    if model == "random":
        cfg = Config(preset=preset)
        cfg.resolve()
        torch.manual_seed(seed)
        return build_enhancer(cfg), {"model": f"random init ({preset})", **vars(cfg)}
    if os.path.isfile(model):
        from safetensors import safe_open

        try:
            with safe_open(model, "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{model} is not a safetensors file ({e})") from None
        if not {"config", "img_size", "patch_size"} <= set(meta):
            raise InputError(f"{model} was not written by python -m cimfast.export (no config in its metadata)")
        cfg = {**json.loads(meta["config"]), "img_size": int(meta["img_size"]), "patch_size": int(meta["patch_size"])}
        if meta.get("layout", "timm") != "timm":
            raise InputError(f"{model} is in the {meta['layout']} layout: export it with --layout timm to evaluate it")
        enhancer = build_enhancer(SimpleNamespace(grad_checkpointing=False, **cfg))
        target = enhancer.backbone if cfg["enhancer"] == "vit" else enhancer
        missing, unexpected = target.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.startswith(("neck.", "head."))]:
            raise InputError(f"{model} does not match its architecture: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return enhancer, {"model": model, **cfg}
    if not os.path.isdir(model):
        raise InputError(f"--model {model}: neither a checkpoint folder, an output directory, a file nor 'random'")
    from cimfast.export import full_state_dict

    ckpt = checkpoint.latest_checkpoint(model) if os.path.isdir(os.path.join(model, "checkpoints")) else model
    if ckpt is None or not os.path.isfile(os.path.join(ckpt, "cimfast_state.json")):
        raise InputError(f"--model {model}: no finished checkpoint there")
    cfg = checkpoint.require_job(ckpt, "cim", "--model")["config"]
    enhancer = build_enhancer(SimpleNamespace(**{**cfg, "grad_checkpointing": False}))
    sd = {k[len("enhancer."):]: v for k, v in full_state_dict(ckpt).items() if k.startswith("enhancer.")}
    enhancer.load_state_dict(sd, strict=True)
    return enhancer, {"model": ckpt, **cfg}


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
    from cimfast.runtime import finish, init_distributed

    if a.protocol == "knn" and (a.k < 1 or a.temperature <= 0):
        raise InputError("--k must be positive and --temperature above 0")
    if a.protocol == "linear" and (a.epochs < 1 or a.batch_size < 1 or a.lr <= 0):
        raise InputError("--epochs, --batch_size and --lr must be positive")
    if a.preset is not None and a.model != "random":
        raise InputError(f"--preset is for --model random: {a.model} carries its own architecture")
    train_path, val_path = resolve_paths(a.train_path, a.val_path, a.cache_dir)  # before the model loads
    enhancer, cfg = load_enhancer(a.model, a.preset or "tiny", a.seed)
    rank, world, device = init_distributed()
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
            results = {kind: linear_probe(tr[kind], ty, va[kind], vy, a.epochs, a.warmup_epochs, a.lr,
                                          a.batch_size, a.weight_decay, a.seed, a.optimizer) for kind in tr}
            settings = {"optimizer": a.optimizer, "epochs": a.epochs, "warmup_epochs": a.warmup_epochs,
                        "base_lr": a.lr, "batch_size": a.batch_size, "weight_decay": a.weight_decay}
        report = {"protocol": a.protocol, "model": cfg["model"], "train_images": splits.sizes["train"],
                  "val_images": splits.sizes["val"], "classes": len(splits.classes), "settings": settings,
                  "results": results, "ranks": world}
        print(json.dumps(report, indent=1))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
    finish()
    return 0


def main(argv=None) -> int:
    from cimfast.preflight import guarded
    from cimfast.runtime import setup_logging

    setup_logging()
    a = build_parser().parse_args(argv)
    return guarded(lambda: evaluate(a), argv)


def cli() -> None:
    """The script's and the console script cimfast-evaluate's exit (see run_and_exit)."""
    from cimfast.preflight import run_and_exit

    run_and_exit(main)


if __name__ == "__main__":
    cli()
