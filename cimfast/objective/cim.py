"""The CIM objective: one training step's forward, top-down.

One step, for a batch of images: (1) two views of one crop, at the enhancer
size and at half of it; (2) the frozen tokenizer turns the small view into
token ids; (3) blockwise masking picks patches; (4) the generator (a small
BEiT) predicts token distributions at the masked patches; (5) a token is
sampled at every masked patch; (6) the frozen decoder turns the corrupted
token map into the corrupted image; (7) the enhancer restores the pixels
(ResPix) or spots the replaced patches (RevDet); (8) one loss, generator +
weight x enhancer, trains both networks. No gradient crosses the sampling.

``CIMModel`` holds the two trainable networks (generator and enhancer). The
frozen tokenizer is kept outside the module tree on purpose: DeepSpeed (and
ZeRO-3 in particular) must neither partition nor optimize it.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cimfast.config.settings import Config
from cimfast.kernels import sample_ce, window_norm_losses, window_normalize
from cimfast.models.resnet import ResNetEnhancer
from cimfast.models.vit import BEiTGenerator, ViTEnhancer, unpatchify
from cimfast.objective.diagnostics import balanced_accuracy, code_counts, trivial_accuracy
from cimfast.pipelines.views import as_unit
from cimfast.tokenizer.files import TokenizerFileError, load_tokenizer
from cimfast.tokenizer.model import Tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_enhancer(cfg: Config) -> nn.Module:
    if cfg.enhancer == "vit":
        return ViTEnhancer(cfg.img_size, cfg.patch_size, cfg.enhancer_dim, cfg.enhancer_depth,
                           cfg.enhancer_heads, cfg.objective, grad_checkpointing=cfg.grad_checkpointing)
    return ResNetEnhancer(cfg.img_size, cfg.patch_size, cfg.objective, layers=cfg.resnet_layers,
                          width=cfg.resnet_width)


class CIMModel(nn.Module):
    def __init__(self, cfg: Config, tokenizer: Tokenizer):
        super().__init__()
        if cfg.img_size is None:
            cfg.resolve()
        self.cfg = cfg
        self.generator = BEiTGenerator(cfg.img_size, cfg.patch_size, cfg.generator_dim, cfg.generator_depth,
                                       cfg.generator_heads, tokenizer.vocab_size)
        self.enhancer = build_enhancer(cfg)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        # A plain attribute inside a tuple: not a registered submodule, so not in
        # parameters(), state_dict() or DeepSpeed's partitioning.
        self._frozen = (tokenizer,)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._frozen[0]

    @property
    def dtype(self) -> torch.dtype:
        """The trained networks' dtype (bf16 under a bf16 DeepSpeed engine)."""
        return self.generator.head.weight.dtype

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)

    def check_inputs(self, images, images_tok, mask):
        cfg = self.cfg
        s, t = cfg.img_size, cfg.tok_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] (RGB at the enhancer size), got {tuple(images.shape)}")
        if images_tok.dim() != 4 or tuple(images_tok.shape[1:]) != (3, t, t):
            raise ValueError(f"tokenizer view must be [B, 3, {t}, {t}], got {tuple(images_tok.shape)}")
        if images_tok.shape[0] != images.shape[0] or tuple(mask.shape) != (images.shape[0], cfg.grid ** 2):
            raise ValueError(f"mask must be [B, {cfg.grid ** 2}] for a batch of {images.shape[0]}, got {tuple(mask.shape)}")
        # The static shapes below need exactly num_masked patches per image.
        # Checked on the device, every step, without a host sync (on CUDA a
        # failed check is a device-side assert; on the CPU it raises here).
        torch._assert_async((mask.sum(1) == cfg.num_masked).all(),
                            f"every mask must have exactly num_masked={cfg.num_masked} masked patches")

    def forward(self, images: torch.Tensor, images_tok: torch.Tensor, mask: torch.Tensor,
                sample_keys: torch.Tensor | None = None, return_visuals: bool = False) -> dict:
        """images [B,3,S,S] and images_tok [B,3,S/2,S/2], uint8 or floats in
        [0, 1] (the same crop at two sizes); mask [B, N] bool, True at the
        patches the generator must fill, made per sample by the data
        pipeline (``cimfast.objective.masking.BlockMaskGenerator``, drawn from the
        sample's own random stream); ``sample_keys`` [B] int64 (one per
        sample, from the loader) make the token draws; None: the batch
        position.

        Returns a dict of scalar tensors (``loss`` and metrics; no host sync)
        and, with ``return_visuals``, the picture's tensors. Each phase is a
        method of its own, so ``benchmarks/profile_step.py`` times the very
        code the step runs.
        """
        self.check_inputs(images, images_tok, mask)
        images, images_tok, mask = as_unit(images), as_unit(images_tok), mask.bool()
        if sample_keys is None:
            sample_keys = torch.arange(images.shape[0], device=images.device)
        ids = self.tokenize(images_tok)  # 1-2. the small view's token ids (frozen)
        pos = self.masked_positions(mask)
        logits = self.generate(images, mask, pos)  # 3-4. token predictions at the masked patches
        gen = self.sample(logits, ids, mask, sample_keys, pos)  # 5. cross-entropy, draws, replaced labels
        corrupted = self.corrupt(gen.corrupted, images.shape[-2:])  # 6. decode: the corrupted image
        out = self.enhance(corrupted)  # 7. restore pixels or detect replaced tokens
        enh_loss, diagnostics = self.enhancer_loss(out, images, gen.replaced)
        result = self.combine(gen, enh_loss, diagnostics, ids, pos, mask)  # 8. one loss for both networks
        if return_visuals:
            result["visuals"] = self._visuals(images, corrupted, gen.replaced, out)
        return result

    @torch.no_grad()
    def tokenize(self, images_tok: torch.Tensor) -> torch.Tensor:
        """[B, 3, S/2, S/2] in [0, 1] -> token ids [B, N]."""
        return self.tokenizer.tokenize(images_tok).reshape(images_tok.shape[0], -1)

    def masked_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices of the masked patches; every image has exactly num_masked of
        them, so the size is static and finding them needs no host sync."""
        return torch.nonzero_static(mask.reshape(-1), size=mask.shape[0] * self.cfg.num_masked).squeeze(1)

    def generate(self, images: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The generator's logits at the masked patches [M, vocab]."""
        return self.generator(self.normalize(images.to(self.dtype)), mask, pos)

    def sample(self, logits, ids, mask, sample_keys, pos):
        """One pass over the logits: cross-entropy, draws, replaced labels (the fused
        kernel on CUDA; no gradient crosses the draws)."""
        return sample_ce(logits, ids, mask, sample_keys, self.cfg.temperature, positions=pos)

    @torch.no_grad()
    def corrupt(self, corrupted_ids: torch.Tensor, size) -> torch.Tensor:
        """The frozen decoder's image of the corrupted token map, at the enhancer's size."""
        grid = self.cfg.grid
        corrupted = self.tokenizer.decode(corrupted_ids.reshape(-1, grid, grid))
        return F.interpolate(corrupted, size=size, mode="bilinear", align_corners=False)

    def enhance(self, corrupted: torch.Tensor) -> torch.Tensor:
        """The enhancer's output [B, N, out] on the normalized corrupted image."""
        return self.enhancer(self.normalize(corrupted.to(self.dtype)))

    def enhancer_loss(self, out: torch.Tensor, images: torch.Tensor, replaced: torch.Tensor) -> tuple:
        """(the enhancer's loss, its diagnostics beside a trivial predictor's)."""
        cfg = self.cfg
        if cfg.objective == "respix":  # pred stays in patch layout: no unpatchify copy
            # one pass over the window statistics gives the loss and the trivial one
            # (predicting zero everywhere: the window mean)
            enh_loss, trivial = window_norm_losses(out, images, cfg.window, cfg.window_eps, patch=cfg.patch_size)
            return enh_loss, {"enh_loss_trivial": trivial}
        enh_loss = F.binary_cross_entropy_with_logits(out.squeeze(-1).float(), replaced)
        with torch.no_grad():
            flagged = out.squeeze(-1) > 0
            return enh_loss, {"det_acc": (flagged == (replaced > 0.5)).float().mean(),
                              "det_bal_acc": balanced_accuracy(flagged, replaced > 0.5),
                              "det_acc_trivial": trivial_accuracy(replaced)}

    def combine(self, gen, enh_loss, diagnostics: dict, ids, pos, mask) -> dict:
        """loss = generator + weight x enhancer, and the step's metrics (no host sync)."""
        gen_loss = gen.loss_rows.mean()
        loss = gen_loss + self.cfg.enhancer_weight * enh_loss
        with torch.no_grad():
            result = {"loss": loss, "gen_loss": gen_loss.detach(), "enh_loss": enh_loss.detach(),
                      "gen_acc": gen.correct.float().mean(),
                      "replaced_frac": gen.replaced.sum() / mask.sum().clamp_min(1),
                      # what CIM learned, beside what a trivial predictor reaches
                      "code_counts": code_counts(ids.reshape(-1)[pos], self.tokenizer.vocab_size),
                      **diagnostics}
        return result

    @torch.no_grad()
    def _visuals(self, images, corrupted, replaced, out) -> dict:
        """Original, corrupted, replaced-patch mask and the enhancer's view of it.

        ResPix: the predicted normalized pixels mapped back with the window
        statistics of the *corrupted* image, the enhancer's own input (the
        original's statistics would leak a blurred original into the
        picture). RevDet: the patches the enhancer flags as replaced.
        """
        cfg = self.cfg
        vis = {"original": images.float(), "corrupted": corrupted.float(),
               "replaced": replaced.reshape(-1, cfg.grid, cfg.grid)}
        if cfg.objective == "respix":
            _, mean, std = window_normalize(corrupted, cfg.window, cfg.window_eps)
            vis["restored"] = (unpatchify(out.float(), cfg.patch_size) * std + mean).clamp(0, 1)
        else:
            vis["detected"] = (out.squeeze(-1) > 0).float().reshape(-1, cfg.grid, cfg.grid)
        return vis


# the package data of cimfast/assets, one folder above this module
TINY_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                              "tiny_tokenizer.safetensors")


def build_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer the config names: a file or folder, or for the ``tiny``
    architecture the small tokenizer that ships with cimfast (trained on the
    demo photographs by ``cimfast.tokenizer_train``; see the README)."""
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path, cfg.encoder_sha256, cfg.decoder_sha256)
    if cfg.tokenizer == "tiny":
        return load_tokenizer(TINY_TOKENIZER)
    raise TokenizerFileError(f"preset {cfg.preset!r} needs the DALL-E tokenizer: --tokenizer_path is not set")
