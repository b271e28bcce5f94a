"""The one attention function every block calls.

Backends: PyTorch SDPA (flash / memory-efficient / cuDNN / math, picked by
PyTorch) and plain ``math`` (the reference). ``CIMFAST_ATTENTION=sdpa|math``
forces one; the choice is logged once.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("cimfast")
BACKENDS = ("sdpa", "math")
_chosen: str | None = None


def attention_math(q, k, v):
    """Reference: q, k, v [B, H, N, D] -> [B, H, N, D]."""
    scale = q.shape[-1] ** -0.5
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


def backend() -> str:
    global _chosen
    if _chosen is None:
        want = os.environ.get("CIMFAST_ATTENTION", "sdpa")
        if want not in BACKENDS:
            raise ValueError(f"CIMFAST_ATTENTION={want!r}: choose one of {', '.join(BACKENDS)}")
        _chosen = want
        log.info("attention backend: %s", _chosen)
    return _chosen


def set_backend(name: str | None) -> None:
    """Force a backend (None: pick again from the environment)."""
    global _chosen
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _chosen = name


def attention(q, k, v):
    if backend() == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return attention_math(q, k, v)
