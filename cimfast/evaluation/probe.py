"""MAE's linear probe (He et al. 2022, appendix A.2, ``main_linprobe.py``)
on cached features: BatchNorm without affine parameters, then a linear
layer (std 0.01), base lr 0.1 x batch / 256, momentum 0.9, no weight decay,
90 epochs with 10 of linear warmup and a cosine schedule. MAE's LARS is an
option; at small batches its steps barely move the head, so SGD is the default."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("cimfast")


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


def linear_probe(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor, *,
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
