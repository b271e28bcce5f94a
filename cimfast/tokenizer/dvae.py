"""The discrete VAE objective of DALL-E (Ramesh et al. 2021, section 2.1 and
appendix A), for training a tokenizer of the DALL-E architecture.

* Encoder logits over the vocabulary per cell, relaxed with Gumbel-softmax at
  temperature ``tau`` (annealed from 1 toward 1/16).
* The decoder reads the relaxed codes through its input layer (the same
  weights that the one-hot / embedding path uses at inference).
* Reconstruction: the logit-Laplace likelihood of the ``map_pixels`` input
  (the decoder's first 3 channels are mu, the last 3 are ln b).
* KL of the per-cell code distribution to the uniform prior, weighted by
  ``beta`` (ramped up from 0). ``beta`` is in DALL-E's convention (6.6 there),
  where the NLL is summed over sub-pixels and the KL over cells; with both
  terms averaged here, the KL is scaled by cells / sub-pixels = 1 / (8*8*3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cimfast.kernels.sampling import hash32, uniform_from_bits
from cimfast.tokenizer.model import Tokenizer, map_pixels, unmap_pixels

KL_SCALE = 8 * 8 * 3  # sub-pixels per token cell


def logit_laplace_nll(x_mapped: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per sub-pixel of ``x_mapped`` in (eps, 1-eps)."""
    mu, ln_b = params[:, :3].float(), params[:, 3:].float().clamp(-7, 7)
    y = torch.logit(x_mapped)
    nll = math.log(2) + ln_b + torch.log(x_mapped * (1 - x_mapped)) + (y - mu).abs() * torch.exp(-ln_b)
    return nll.mean()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over cells of KL(q || uniform), logits [B, V, h, w]."""
    logq = F.log_softmax(logits.float(), dim=1)
    return (logq.exp() * logq).sum(1).mean() + math.log(logits.shape[1])


def gumbel_noise(sample_keys: torch.Tensor, shape) -> torch.Tensor:
    """Counter-based Gumbel noise [B, V, h, w]: a pure function of each sample's
    key, so resumed and differently sharded runs draw the same noise."""
    B = shape[0]
    n = math.prod(shape[1:])
    idx = torch.arange(n, device=sample_keys.device, dtype=torch.int64)
    u = uniform_from_bits(hash32(hash32(sample_keys.to(torch.int64) ^ 0x5BD1E995).unsqueeze(1) ^ idx))
    return -torch.log(-torch.log(u)).view(B, *shape[1:])


def usage_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(code marginal || uniform): the codes' average probability over the
    batch and the cells against the uniform distribution. 0 when every code is
    used alike, log(vocab) when one code takes all. (The per-cell KL to the
    uniform prior does not see this: every cell can be uncertain among the
    same few codes.)"""
    marginal = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    return (marginal * (marginal.clamp_min(1e-12) * logits.shape[1]).log()).sum()


def dvae_loss(tok: Tokenizer, x01: torch.Tensor, tau: float, beta: float, sample_keys: torch.Tensor,
              hard: bool = False, usage_weight: float = 0.0) -> dict:
    """One dVAE step's loss on images ``x01`` [B, 3, H, W] in [0, 1]; ``usage_weight``
    adds the codebook-usage term ``usage_kl`` (0: DALL-E's recipe)."""
    x = map_pixels(x01)
    logits = tok.encoder(x)  # [B, V, h, w]
    y = ((logits.float() + gumbel_noise(sample_keys, logits.shape)) / tau).softmax(dim=1)
    if hard:  # straight-through: one-hot forward, relaxed gradient
        y = F.one_hot(y.argmax(1), y.shape[1]).permute(0, 3, 1, 2).float() - y.detach() + y
    soft = y
    params = tok.decoder.forward_soft(soft.permute(0, 2, 3, 1))
    nll = logit_laplace_nll(x, params)
    kl = kl_to_uniform(logits)
    with torch.no_grad():
        recon = unmap_pixels(torch.sigmoid(params[:, :3].float()))
        mse = F.mse_loss(recon, x01.float())
    usage = usage_kl(logits)
    loss = nll + beta * kl / KL_SCALE + usage_weight * usage
    return {"loss": loss, "nll": nll.detach(), "kl": kl.detach(), "usage_kl": usage.detach(), "mse": mse,
            "logits": logits.detach()}


def tau_at(step: int, total: int, start: float = 1.0, end: float = 1 / 16) -> float:
    """Exponential annealing from ``start`` to ``end`` over ``total`` steps."""
    frac = min(1.0, step / max(1, total))
    return start * (end / start) ** frac


def beta_at(step: int, ramp: int, final: float) -> float:
    """Linear ramp of the KL weight from 0 to ``final`` over ``ramp`` steps."""
    return final * min(1.0, step / max(1, ramp))


@torch.no_grad()
def code_usage(ids: torch.Tensor, vocab: int) -> dict:
    """Perplexity of the batch's hard codes and the share of the codebook they use,
    as device scalars (logged each interval: collapse shows as they fall)."""
    counts = torch.bincount(ids.reshape(-1), minlength=vocab).float()
    p = counts / counts.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {"code_perplexity": entropy.exp(), "codes_used": (counts > 0).float().mean()}


@torch.no_grad()
def codebook_stats(ids: torch.Tensor, vocab: int) -> dict:
    """Perplexity of the code histogram and the fraction of codes used."""
    counts = torch.bincount(ids.reshape(-1), minlength=vocab).double()
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(ent.exp()), "used_fraction": float((counts > 0).double().mean())}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
