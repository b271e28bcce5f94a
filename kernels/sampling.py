"""Sample replacement tokens from the generator and build the corrupted token map.

Reference semantics (the specification the fused kernel follows exactly):

* ``logits`` [M, V] are the generator's outputs at the M masked positions, in
  the row order of ``mask.nonzero()`` (row-major over [B, N]).
* Row r draws ``argmax_j(logits[r, j] / T + G[r, j])`` (Gumbel-max: exactly a
  draw from softmax(logits / T)). The Gumbel noise is counter-based:
  ``G[r, j] = -log(-log(u))`` with ``u`` made from ``hash32(key[r] ^ j)``, and
  ``key[r] = hash32(hash32(sample_key[b]) ^ n)`` for the masked position
  (b, n). A sample's draws thus depend on its own key only, never on the
  batch it sits in, the rank or how many numbers were drawn before: a resumed
  run or a run on another number of ranks draws the same tokens.
* ``corrupted`` = ``ids`` with the masked positions overwritten by the draws;
  unmasked positions untouched.
* ``replaced`` [B, N] (float 0/1) is 1 where a masked position's draw differs
  from the original id (ELECTRA: a draw equal to the original counts as original).

No gradient flows through sampling.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding uint32 values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32  # wraps in int64; the low 32 bits are exact
    return x ^ (x >> 16)


def uniform_from_bits(h: torch.Tensor) -> torch.Tensor:
    """uint32 hash -> float32 uniform in (0, 1) from its top 24 bits."""
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def row_keys(sample_keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per masked row key [M] (int64, uint32 range) from per-sample keys [B]."""
    pos = torch.arange(mask.shape[1], device=mask.device, dtype=torch.int64)
    keys = hash32(hash32(sample_keys.to(torch.int64)).unsqueeze(1) ^ pos)  # [B, N]
    return keys[mask.bool()]


def gumbel_noise_reference(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    cols = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    u = uniform_from_bits(hash32(keys.unsqueeze(1) ^ cols))
    return -torch.log(-torch.log(u))


def _check(logits, ids, mask, sample_keys, temperature):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [masked positions, vocab], got {tuple(logits.shape)}")
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be [B, N]")
    if sample_keys.shape != (ids.shape[0],):
        raise ValueError(f"sample_keys must be [B]={ids.shape[0]}, got {tuple(sample_keys.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def sample_replace_reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                             sample_keys: torch.Tensor, temperature: float = 1.0):
    """Plain PyTorch: Gumbel noise [M, V], argmax, scatter. Returns (corrupted ids, replaced)."""
    _check(logits, ids, mask, sample_keys, temperature)
    mask = mask.bool()
    with torch.no_grad():
        keys = row_keys(sample_keys, mask)
        if keys.shape[0] != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} logit rows for {keys.shape[0]} masked positions")
        scores = logits.detach().float() / temperature + gumbel_noise_reference(keys, logits.shape[1])
        draws = scores.argmax(dim=-1)
        corrupted = ids.clone()
        corrupted[mask] = draws.to(ids.dtype)
        replaced = (corrupted != ids).float()
    return corrupted, replaced


def sample_replace(logits, ids, mask, sample_keys, temperature: float = 1.0):
    """Dispatch point for sampling (the fused kernel comes with the Triton kernels)."""
    return sample_replace_reference(logits, ids, mask, sample_keys, temperature)
