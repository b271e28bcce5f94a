"""Features of a frozen enhancer and DINO's weighted k-NN on them (Caron et
al. 2021, ``eval_knn.py``): cosine similarity of L2-normalized features,
the k = 20 nearest training images vote with weight exp(similarity / 0.07).
Features are extracted on every rank and gathered; the comparison runs on
rank 0, on the device."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cimfast.evaluation.labelled import ViewSource, check_same_classes, labelled_files, normalized, resolve_paths

log = logging.getLogger("cimfast")


# The feature kind an enhancer is judged by, with either objective: a ViT's mean-pooled patch
# tokens (neither ResPix nor RevDet puts a loss on [CLS], which gains less and not on every
# seed: benchmarks/RESULTS.md, "What the quickstart learns"), a ResNet's pooled last stage.
# The k-NN monitor's knn_top1, evaluate's headline and fine-tuning's avg pool use it.
DEFAULT_FEATURES = ("mean", "pool")


def default_kind(kinds) -> str:
    """The default feature kind among ``kinds`` (an enhancer's feature dict or its keys)."""
    kind = next((k for k in DEFAULT_FEATURES if k in kinds), None)
    if kind is None:
        raise ValueError(f"no default feature kind ({' or '.join(DEFAULT_FEATURES)}) among {sorted(kinds)}")
    return kind


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
            else:
                check_same_classes(train_path, self.classes, val_path, classes)

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
