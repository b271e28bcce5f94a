"""The one attention function every block calls.

Backends, probed once and logged:
* ``xformers``: ``memory_efficient_attention`` (CUDA only; an optional extra),
* ``sdpa``: PyTorch's scaled_dot_product_attention (flash / cuDNN /
  memory-efficient / math, picked by PyTorch),
* ``math``: the plain reference.
Default: xformers where it imports and runs on a probe of the model's device
and dtype, else sdpa. ``CIMFAST_ATTENTION=xformers|sdpa|math`` (or
``set_backend``) forces one.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("cimfast")
BACKENDS = ("xformers", "sdpa", "math")
_forced: str | None = None
_probed: dict = {}


def attention_math(q, k, v):
    """Reference: q, k, v [B, H, N, D] -> [B, H, N, D]."""
    scale = q.shape[-1] ** -0.5
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention_xformers(q, k, v):
    import xformers.ops as xops

    # xformers takes [B, N, H, D]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _xformers_works(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False
    try:
        q = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
        attention_xformers(q, q, q)
        return True
    except Exception as e:  # not installed, no kernel for this GPU/dtype, wrong CUDA runtime, ...
        log.info("xformers attention unavailable (%s: %s); using PyTorch SDPA", type(e).__name__, str(e)[:120])
        return False


def backend(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> str:
    """The backend for tensors on ``device`` of ``dtype`` (probed once per pair)."""
    want = _forced or os.environ.get("CIMFAST_ATTENTION")
    if want is not None and want not in BACKENDS:
        raise ValueError(f"CIMFAST_ATTENTION={want!r}: choose one of {', '.join(BACKENDS)}")
    key = (want, str(device), dtype)
    if key not in _probed and torch.compiler.is_compiling():
        return want or "sdpa"  # no probing or logging inside a graph: call probe() eagerly first
    if key not in _probed:
        if want is None:
            choice = "xformers" if device is not None and _xformers_works(device, dtype) else "sdpa"
        else:
            choice = want
        _probed[key] = choice
        log.info("attention backend on %s/%s: %s%s", device, str(dtype).replace("torch.", ""), choice,
                 " (forced)" if want else "")
    return _probed[key]


def probe(device: torch.device, dtype: torch.dtype) -> str:
    """Choose (and log) the backend for ``device``/``dtype`` eagerly, before anything is compiled."""
    return backend(device, dtype)


def set_backend(name: str | None) -> None:
    """Force a backend (None: choose again from the environment and the probe)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _forced = name
    _probed.clear()


def attention(q, k, v):
    b = backend(q.device, q.dtype)
    if b == "xformers":
        return attention_xformers(q, k, v)
    if b == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return attention_math(q, k, v)
