"""The enhancer to evaluate or fine-tune, from a checkpoint, an output
directory, an exported file, or freshly initialized (``random``)."""
from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import torch
import torch.nn as nn

from cimfast.config.settings import Config, InputError
from cimfast.engine import checkpoint
from cimfast.engine.checkpoint import full_state_dict
from cimfast.objective.cim import build_enhancer

log = logging.getLogger("cimfast")


def load_enhancer(model: str, preset: str = "tiny", seed: int = 0) -> tuple[nn.Module, dict]:
    """The enhancer of a checkpoint, an output directory, an exported file or
    ``random`` (``preset``'s, freshly initialized), and its settings."""

    if model == "random":
        cfg = Config(preset=preset)
        cfg.resolve()
        torch.manual_seed(seed)
        return build_enhancer(cfg), {"model": f"random init ({preset})", **vars(cfg)}
    if os.path.isfile(model):
        from safetensors import safe_open

        try:
            with safe_open(model, "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise InputError(f"{model} is not a safetensors file ({e})") from None
        if not {"config", "img_size", "patch_size"} <= set(meta):
            raise InputError(f"{model} was not written by python -m cimfast.export (no config in its metadata)")
        cfg = {**json.loads(meta["config"]), "img_size": int(meta["img_size"]), "patch_size": int(meta["patch_size"])}
        if meta.get("layout", "timm") != "timm":
            raise InputError(f"{model} is in the {meta['layout']} layout: export it with --layout timm to evaluate it")
        enhancer = build_enhancer(SimpleNamespace(grad_checkpointing=False, **cfg))
        target = enhancer.backbone if cfg["enhancer"] == "vit" else enhancer
        missing, unexpected = target.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.startswith(("neck.", "head."))]:
            raise InputError(f"{model} does not match its architecture: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return enhancer, {"model": model, **cfg}
    if not os.path.isdir(model):
        raise InputError(f"--model {model}: neither a checkpoint folder, an output directory, a file nor 'random'")

    ckpt = checkpoint.latest_checkpoint(model) if os.path.isdir(os.path.join(model, "checkpoints")) else model
    if ckpt is None or not os.path.isfile(os.path.join(ckpt, "cimfast_state.json")):
        raise InputError(f"--model {model}: no finished checkpoint there")
    cfg = checkpoint.require_job(ckpt, "cim", "--model")["config"]
    enhancer = build_enhancer(SimpleNamespace(**{**cfg, "grad_checkpointing": False}))
    sd = {k[len("enhancer."):]: v for k, v in full_state_dict(ckpt).items() if k.startswith("enhancer.")}
    enhancer.load_state_dict(sd, strict=True)
    return enhancer, {"model": ckpt, **cfg}
