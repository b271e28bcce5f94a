"""The frozen image tokenizer: the DALL-E discrete VAE (encoder and decoder).

Module and parameter names follow the official ``dall_e`` package exactly
(``blocks.group_1.block_1.res_path.conv_1.w`` ...), so the official
``encoder.pkl`` / ``decoder.pkl`` load unchanged (``cimfast.tokenizer.files``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1
DOWNSAMPLE = 8  # three 2x poolings: a 112 px view gives a 14 x 14 token grid



def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] image -> the logit-Laplace input range [eps, 1 - eps]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


# --------------------------------------------------------------------------
# Architecture (names as in dall_e.utils / dall_e.encoder / dall_e.decoder)
# --------------------------------------------------------------------------
class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: parameters ``w`` and ``b``, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        w = torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class _ResBlock(nn.Module):
    """id_path + post_gain * res_path, the residual branch at width n_out / 4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_ResBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, (3, 3, 3, 1))


class DecoderBlock(_ResBlock):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, (1, 3, 3, 3))


@dataclass(frozen=True)
class TokenizerSpec:
    """Sizes of a dVAE of the DALL-E architecture. Defaults are the official ones."""

    n_hid: int = 256
    n_init: int = 128
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    group_count: int = 4  # fixed by the architecture (3 poolings)


DALLE_SPEC = TokenizerSpec()
TINY_SPEC = TokenizerSpec(n_hid=32, n_init=32, n_blk_per_group=1, vocab_size=512)


def _group(blocks, resample=None):
    items = [(f"block_{i + 1}", blk) for i, blk in enumerate(blocks)]
    if resample is not None:
        items.append(resample)
    return nn.Sequential(OrderedDict(items))


class Encoder(nn.Module):
    def __init__(self, spec: TokenizerSpec = DALLE_SPEC):
        super().__init__()
        h, nb = spec.n_hid, spec.n_blk_per_group
        n_layers = spec.group_count * nb
        widths = [h, 2 * h, 4 * h, 8 * h]
        groups = []
        n_in = h
        for g, w in enumerate(widths):
            blks = []
            for _ in range(nb):
                blks.append(EncoderBlock(n_in, w, n_layers))
                n_in = w
            pool = ("pool", nn.MaxPool2d(kernel_size=2)) if g < 3 else None
            groups.append((f"group_{g + 1}", _group(blks, pool)))
        self.vocab_size = spec.vocab_size
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(3, h, 7)),
            *groups,
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * h, spec.vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_in_own_dtypes(self.blocks.named_children(), x)


def run_in_own_dtypes(children, x: torch.Tensor) -> torch.Tensor:
    """Each part runs in its own weights' dtype: on the bf16 fast path the
    input and output convolutions stay fp32 (as OpenAI's DALL-E code keeps
    them), the residual groups run in bf16."""
    for _, module in children:
        p = next(module.parameters(), None)
        x = module(x if p is None else x.to(p.dtype))
    return x


class Decoder(nn.Module):
    def __init__(self, spec: TokenizerSpec = DALLE_SPEC):
        super().__init__()
        h, nb = spec.n_hid, spec.n_blk_per_group
        n_layers = spec.group_count * nb
        widths = [8 * h, 4 * h, 2 * h, h]
        groups = []
        n_in = spec.n_init
        for g, w in enumerate(widths):
            blks = []
            for _ in range(nb):
                blks.append(DecoderBlock(n_in, w, n_layers))
                n_in = w
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < 3 else None
            groups.append((f"group_{g + 1}", _group(blks, up)))
        self.vocab_size = spec.vocab_size
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(spec.vocab_size, spec.n_init, 1)),
            *groups,
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(h, 6, 1))]))),
        ]))

    def forward_onehot(self, onehot: torch.Tensor) -> torch.Tensor:
        """The official form: a 1x1 convolution over the one-hot map (reference)."""
        return run_in_own_dtypes(self.blocks.named_children(), onehot)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> 6-channel logit-Laplace parameters.

        The input 1x1 convolution over a one-hot map of ``vocab`` channels is
        exactly a lookup of the weight's columns: computed as an embedding.
        """
        return self.forward_embedded(F.embedding(ids, self.input_table()))

    def forward_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed codes [B, h, w, vocab] (dVAE training) -> 6-channel parameters."""
        return self.forward_embedded(probs @ self.input_table().to(probs.dtype))

    def input_table(self) -> torch.Tensor:
        conv = self.blocks.input
        return conv.w.view(conv.n_out, conv.n_in).t()  # [vocab, n_init]

    def forward_embedded(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, h, w, n_init] (the input layer's output before its bias)."""
        x = (x + self.blocks.input.b.to(x.dtype)).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        return run_in_own_dtypes(((n, m) for n, m in self.blocks.named_children() if n != "input"), x)


def spec_from_state_dicts(enc: dict, dec: dict) -> TokenizerSpec:
    n_hid = enc["blocks.input.w"].shape[0]
    vocab = enc["blocks.output.conv.w"].shape[0]
    n_init = dec["blocks.input.w"].shape[0]
    nb = len({k.split(".")[2] for k in enc if k.startswith("blocks.group_1.block_")})
    spec = TokenizerSpec(n_hid=n_hid, n_init=n_init, n_blk_per_group=nb, vocab_size=vocab)
    if dec["blocks.input.w"].shape[1] != vocab:
        raise ValueError(f"encoder vocabulary {vocab} != decoder vocabulary "
                         f"{dec['blocks.input.w'].shape[1]}: files of two different tokenizers")
    return spec


class Tokenizer(nn.Module):
    """Frozen dVAE: ``tokenize`` ([0,1] images -> ids) and ``decode`` (ids -> [0,1] images)."""

    def __init__(self, spec: TokenizerSpec = DALLE_SPEC):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        self.requires_grad_(False)
        self.eval()
        self._run = (self.encoder, self.decoder)  # a tuple: compiled wrappers are not submodules

    def fast(self, dtype: torch.dtype | None = torch.bfloat16, compile: bool = False) -> "Tokenizer":
        """The inference fast path: the residual groups' weights in ``dtype``
        (the input and output convolutions stay fp32, as in OpenAI's DALL-E
        code), channels-last activations, and (on CUDA) ``torch.compile``d
        encoder and decoder. Token ids can differ from the fp32 ones where two
        logits tie within bf16 precision (benchmarks/tokenizer_agreement.py)."""
        if dtype is not None:
            self.to(dtype)
            for part in (self.encoder, self.decoder):
                part.blocks.input.float()
                part.blocks.output.float()
        self.to(memory_format=torch.channels_last)
        if compile:
            self._run = (torch.compile(self.encoder, dynamic=False), torch.compile(self.decoder, dynamic=False))
        return self

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    def _check(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"tokenizer expects images [B, 3, H, W], got {tuple(x.shape)}")
        if x.shape[2] % DOWNSAMPLE or x.shape[3] % DOWNSAMPLE:
            raise ValueError(f"tokenizer image size {tuple(x.shape[2:])} is not a multiple of {DOWNSAMPLE}")

    # no_grad rather than inference_mode: the decoded image is the enhancer's
    # input, and autograd may not save inference tensors for backward.
    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> token ids [B, H/8, W/8] (argmax of the logits)."""
        self._check(x)
        x = map_pixels(x).contiguous(memory_format=torch.channels_last)  # cast by each part to its dtype
        return self._run[0](x).argmax(dim=1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> image [B, 3, 8h, 8w] in [0, 1] (fp32)."""
        return unmap_pixels(torch.sigmoid(self._run[1](ids)[:, :3].float()))

    @torch.no_grad()
    def decode_onehot(self, ids: torch.Tensor) -> torch.Tensor:
        """The plain (reference) decode through a one-hot tensor."""
        onehot = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()
        onehot = onehot.to(self.decoder.blocks.input.w.dtype)
        return unmap_pixels(torch.sigmoid(self.decoder.forward_onehot(onehot)[:, :3].float()))
