"""The frozen image tokenizer: the DALL-E discrete VAE (encoder and decoder).

Module and parameter names follow the official ``dall_e`` package exactly
(``blocks.group_1.block_1.res_path.conv_1.w`` ...), so the official
``encoder.pkl`` / ``decoder.pkl`` load unchanged (``cimfast.tokenizer.files``).

The modules' own ``forward`` is the official form, kept as the reference.
Tokenizing and decoding run exact rewrites of it, tested equal in fp32:
- the residual gain folded into each block's last convolution when it is a
  power of two (1/64 and 1/16 for the shipped sizes: the scaling is exact);
  other gains (three blocks a group: 1/144) scale the branch as the official
  form does;
- in the decoder, the first block of each upsampled group runs its 1x1
  convolutions (``id_path`` and ``conv_1``) and the ReLU before them on the
  pixels before the nearest 2x upsample: every one of those is pointwise,
  and nearest upsampling only copies pixels, so each output is the same
  number computed once instead of four times (9.2 of the DALL-E decoder's
  58.5 GFLOP per 112 px image);
- the output convolution computes only the channels asked for (the image
  needs 3 of its 6).
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

    def forward(self, x):  # the official form
        return self.id_path(x) + self.post_gain * self.res_path(x)

    def fast_forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """``forward``, rewritten exactly: the gain folded into the last convolution;
        with ``upsample``, ``forward(up(x))`` with the leading pointwise work (ReLU,
        1x1 convolutions) done before the nearest 2x upsample."""
        convs = [m for m in self.res_path if isinstance(m, Conv2d)]
        fold = math.frexp(self.post_gain)[0] == 0.5  # a power of two scales every float exactly
        skip = self.id_path(x)
        h = x
        for i, conv in enumerate(convs):
            w, b = conv.w, conv.b
            if i == len(convs) - 1 and fold:
                w, b = w * self.post_gain, b * self.post_gain
            h = F.conv2d(F.relu(h), w.to(h.dtype), b.to(h.dtype), padding=(conv.kw - 1) // 2)
            if i == 0 and upsample:
                if conv.kw != 1:
                    raise ValueError("only a block that starts with a 1x1 convolution runs before an upsample")
                h, skip = _upsample(h), _upsample(skip)
        return skip + h if fold else skip + self.post_gain * h


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


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
        # the output convolution's weight in FP8 and its scales, made once by Tokenizer.fast (frozen weights)
        self.register_buffer("fp8_weight", None, persistent=False)
        self.register_buffer("fp8_scale", None, persistent=False)
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

    @property
    def fp8_logits(self) -> bool:
        """Whether the 8192-way output convolution runs as an FP8 matmul."""
        return self.fp8_weight is not None

    def quantize_logits(self, on: bool) -> None:
        """The output convolution's weight in FP8 (e4m3), one scale per output channel,
        made once: the tokenizer never trains. Off: the plain convolution."""
        if not on:
            self.fp8_weight = self.fp8_scale = None
            return
        conv = self.blocks.output.conv
        w = conv.w.detach().view(conv.n_out, conv.n_in).float()
        self.fp8_scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [channels, 1]
        self.fp8_weight = (w / self.fp8_scale).to(torch.float8_e4m3fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_logits:
            x = run_fast(((n, m) for n, m in self.blocks.named_children() if n != "output"), x)
            return fp8_conv1x1(F.relu(x), self.fp8_weight, self.fp8_scale, self.blocks.output.conv.b)
        return run_fast(self.blocks.named_children(), x)

    def forward_official(self, x: torch.Tensor) -> torch.Tensor:
        """The official form, module by module (the reference of ``forward``)."""
        return run_in_own_dtypes(self.blocks.named_children(), x)


def run_fast(children, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
    """``run_in_own_dtypes`` over the same modules with the exact rewrites: each
    block's ``fast_forward``; an upsample deferred into the next group's first
    block; the output convolution's first ``out_channels`` channels only."""
    pending_upsample = False
    for name, module in children:
        p = next(module.parameters(), None)
        x = x if p is None else x.to(p.dtype)
        if name.startswith("group_"):
            for part_name, part in module.named_children():
                if isinstance(part, nn.Upsample):
                    pending_upsample = True
                elif isinstance(part, _ResBlock):
                    x = part.fast_forward(x, upsample=pending_upsample)
                    pending_upsample = False
                else:
                    x = part(x)
        elif name == "output":
            conv = module.conv
            c = out_channels or conv.n_out
            x = F.conv2d(F.relu(x), conv.w[:c].to(x.dtype), conv.b[:c].to(x.dtype), padding=(conv.kw - 1) // 2)
        else:
            x = module(x)
    if pending_upsample:
        x = _upsample(x)
    return x


FP8_MAX = 448.0  # largest float8_e4m3fn


def fp8_conv1x1(x: torch.Tensor, w8: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as one FP8 (e4m3) matmul, scaled per pixel and per output
    channel (``torch._scaled_mm``'s row-wise scales; ``w8`` [out, in] and ``scale_w``
    [out, 1] from ``Encoder.quantize_logits``), bf16 out: for argmax-only logits,
    where the rounding only matters at near-ties (benchmarks/tokenizer_agreement.py
    measures how often)."""
    B, C, H, W = x.shape
    a = x.permute(0, 2, 3, 1).reshape(-1, C).float()
    scale_a = (a.abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [pixels, 1]
    a8 = (a / scale_a).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(a8, w8.t(), scale_a=scale_a, scale_b=scale_w.t(), out_dtype=torch.bfloat16)
    y = y + bias.to(y.dtype)
    return y.view(B, H, W, w8.shape[0]).permute(0, 3, 1, 2)


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

    def forward(self, ids: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        """Token ids [B, h, w] -> the logit-Laplace parameters (6 channels, or the
        first ``out_channels``: 3 are the image).

        The input 1x1 convolution over a one-hot map of ``vocab`` channels is
        exactly a lookup of the weight's columns: computed as an embedding.
        """
        return self.forward_embedded(F.embedding(ids, self.input_table()), out_channels)

    def forward_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Relaxed codes [B, h, w, vocab] (dVAE training) -> 6-channel parameters."""
        return self.forward_embedded(probs @ self.input_table().to(probs.dtype))

    def input_table(self) -> torch.Tensor:
        conv = self.blocks.input
        return conv.w.view(conv.n_out, conv.n_in).t()  # [vocab, n_init]

    def forward_embedded(self, x: torch.Tensor, out_channels: int | None = None,
                         official: bool = False) -> torch.Tensor:
        """x [B, h, w, n_init] (the input layer's output before its bias); ``official``:
        the modules' own forward (the reference of the rewrites), all channels."""
        x = (x + self.blocks.input.b.to(x.dtype)).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        children = ((n, m) for n, m in self.blocks.named_children() if n != "input")
        if official:
            return run_in_own_dtypes(children, x)
        return run_fast(children, x, out_channels)


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

    def fast(self, dtype: torch.dtype | None = torch.bfloat16, compile: bool = False, *, io_dtype: bool = False,
             fp8_logits: bool = False, fuse: bool = False) -> "Tokenizer":
        """The inference fast path: the residual groups' weights in ``dtype``
        (the input and output convolutions stay fp32, as in OpenAI's DALL-E
        code, unless ``io_dtype``), channels-last activations, and (on CUDA)
        ``torch.compile``d encoder and decoder. ``fp8_logits``: the encoder's
        output convolution as an FP8 matmul. ``fuse`` (with ``compile``):
        inductor lowers 1x1 convolutions to matmuls and autotunes them with
        bias and ReLU fused in. Token ids can differ from the fp32 ones where
        two logits tie within the precision (benchmarks/tokenizer_agreement.py)."""
        if dtype is not None:
            self.to(dtype)
            if not io_dtype:
                for part in (self.encoder, self.decoder):
                    part.blocks.input.float()
                    part.blocks.output.float()
        if fp8_logits and (8 * self.spec.n_hid) % 16 or fp8_logits and self.spec.vocab_size % 16:
            raise ValueError(f"FP8 logits need the encoder's width ({8 * self.spec.n_hid}) and vocabulary "
                             f"({self.spec.vocab_size}) to be multiples of 16 (torch._scaled_mm)")
        self.to(memory_format=torch.channels_last)
        self.encoder.quantize_logits(fp8_logits)  # after every cast: Module.to would cast FP8 too
        if compile:
            options = {"conv_1x1_as_mm": True, "max_autotune": True} if fuse else None
            self._run = tuple(torch.compile(part, dynamic=False, options=options)
                              for part in (self.encoder, self.decoder))
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
        return unmap_pixels(torch.sigmoid(self._run[1](ids, 3).float()))

    @torch.no_grad()
    def tokenize_official(self, x: torch.Tensor) -> torch.Tensor:
        """The official form's token ids (the reference of ``tokenize``)."""
        self._check(x)
        x = map_pixels(x).contiguous(memory_format=torch.channels_last)
        return self.encoder.forward_official(x).argmax(dim=1)

    @torch.no_grad()
    def decode_onehot(self, ids: torch.Tensor) -> torch.Tensor:
        """The plain (reference) decode through a one-hot tensor."""
        onehot = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()
        onehot = onehot.to(self.decoder.blocks.input.w.dtype)
        return unmap_pixels(torch.sigmoid(self.decoder.forward_onehot(onehot)[:, :3].float()))
