"""ViT blocks, the ViT enhancer and the BEiT generator.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv`` ...), so the exported
enhancer loads into ``timm.create_model('vit_base_patch16_224')`` as it is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cimfast.models.attention import attention


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTBackbone(nn.Module):
    """Patch embedding + [CLS] + learned positions + blocks + final norm."""

    def __init__(self, img_size: int, patch: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, grad_checkpointing: bool = False):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch}")
        self.img_size, self.patch, self.dim = img_size, patch, dim
        self.grid = img_size // patch
        self.num_patches = self.grid**2
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = grad_checkpointing
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def check_input(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"expected images [B, 3, {self.img_size}, {self.img_size}], got {tuple(x.shape)}")

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, dim] (patch embeddings) -> normed features [B, 1 + N, dim]."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


class ViTEnhancer(nn.Module):
    """Sees the corrupted image; per patch it predicts the window-normalized
    pixels (ResPix, ``patch*patch*3`` values) or whether the patch's token was
    replaced (RevDet, one logit)."""

    def __init__(self, img_size: int, patch: int, dim: int, depth: int, heads: int,
                 objective: str, mlp_ratio: float = 4.0, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone = ViTBackbone(img_size, patch, dim, depth, heads, mlp_ratio, grad_checkpointing)
        out = patch * patch * 3 if objective == "respix" else 1
        self.head = nn.Linear(dim, out)
        _init_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalized -> [B, N, out]."""
        self.backbone.check_input(x)
        feats = self.backbone.forward_tokens(self.backbone.patch_embed(x))
        return self.head(feats[:, 1:])

    def features(self, x: torch.Tensor) -> dict:
        """Image-level features for evaluation: the [CLS] token and the mean of
        the patch tokens, both after the final norm."""
        feats = self.backbone.forward_tokens(self.backbone.patch_embed(x))
        return {"mean": feats[:, 1:].mean(1), "cls": feats[:, 0]}

    def timm_state_dict(self) -> dict:
        """The backbone under timm's names (no classifier head)."""
        return {k: v for k, v in self.backbone.state_dict().items()}


class BEiTGenerator(nn.Module):
    """Small BEiT: masked patches replaced by a learned [MASK] embedding; a head
    over the tokenizer vocabulary at every position (used at masked ones)."""

    def __init__(self, img_size: int, patch: int, dim: int, depth: int, heads: int,
                 vocab_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.backbone = ViTBackbone(img_size, patch, dim, depth, heads, mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim, vocab_size)
        _init_weights(self.head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, H, W] normalized, mask [B, N] bool -> logits at masked
        positions [M, vocab], rows in the order of ``mask.nonzero()``.

        ``pos`` (the flat indices of the masked positions, when the caller
        knows their count, from ``torch.nonzero_static``) keeps shapes static:
        no host sync, no graph break."""
        self.backbone.check_input(x)
        tokens = self.backbone.patch_embed(x)
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match {tuple(tokens.shape[:2])} patches")
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        feats = self.backbone.forward_tokens(tokens)[:, 1:]
        if pos is None:
            return self.head(feats[mask])
        return self.head(feats.flatten(0, 1)[pos])


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C] (MAE's order: row, column, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // patch, W // patch
    x = imgs.reshape(B, C, h, patch, w, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, patch * patch * C)


def unpatchify(x: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    B, N, _ = x.shape
    h = w = int(N**0.5)
    x = x.reshape(B, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, h * patch, w * patch)
