"""ResNet-50 enhancer with per-patch outputs.

The trunk's names are timm's (and torchvision's) ``resnet50`` names
(``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``downsample.0``), so the exported
trunk loads into ``timm.create_model('resnet50')``. A small FPN-style neck
brings the stride-32 output to the stride-16 patch grid (adding the stride-16
features) so the heads see one feature vector per 16x16 patch, exactly like
the ViT enhancer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))
        nn.init.zeros_(self.bn3.weight)  # each residual branch starts as identity

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetEnhancer(nn.Module):
    def __init__(self, img_size: int, patch: int, objective: str, layers=(3, 4, 6, 3),
                 width: int = 64, neck_dim: int = 256):
        super().__init__()
        if patch != 16:
            raise ValueError(f"the ResNet enhancer predicts on a stride-16 grid; patch size must be 16, got {patch}")
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch}")
        self.img_size, self.patch, self.grid = img_size, patch, img_size // patch
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, (n, s) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2**i
            blocks = [Bottleneck(inplanes, planes, s)] + [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.neck = nn.ModuleDict({
            "c3": nn.Conv2d(width * 4 * 4, neck_dim, 1),
            "c4": nn.Conv2d(inplanes, neck_dim, 1),
        })
        self.head = nn.Linear(neck_dim, patch * patch * 3 if objective == "respix" else 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in self.neck.values():
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalized -> [B, N, out] with N = (H/16)^2."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"expected images [B, 3, {self.img_size}, {self.img_size}], got {tuple(x.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        c4 = self.layer4(c3)
        f = self.neck["c3"](c3) + F.interpolate(self.neck["c4"](c4), size=c3.shape[-2:], mode="nearest")
        f = F.gelu(f).flatten(2).transpose(1, 2)  # [B, N, neck_dim]
        return self.head(f)

    def features(self, x: torch.Tensor) -> dict:
        """Image-level features for evaluation: the last stage globally average-pooled (timm's ``resnet50`` features)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return {"pool": self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))}

    def timm_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("neck.", "head."))}
