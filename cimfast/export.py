"""Export the enhancer of a checkpoint as a timm state dict (safetensors).

    python -m cimfast.export CHECKPOINT OUT.safetensors

CHECKPOINT is a checkpoint folder (``<output_dir>/checkpoints/step_N``) or an
output directory (its latest checkpoint). ZeRO-1/2/3 checkpoints are merged
with DeepSpeed's zero_to_fp32 (every file read with ``weights_only=True``
first); the names and shapes are timm's ``vit_*_patch16_224`` / ``resnet50``
ones. The file's metadata names the timm model and its keyword arguments
(``timm_model``, ``timm_kwargs``, ``timm_create``), and the command prints
the line that loads it (the CIM heads are left out).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch
from safetensors.torch import save_file

from cimfast import checkpoint
from cimfast.config import InputError

# timm's ViT of each width: (name, its depth, its heads); other depths, heads,
# image and patch sizes are passed to timm.create_model as keyword arguments.
TIMM_VITS = {192: ("vit_tiny_patch16_224", 12, 3), 384: ("vit_small_patch16_224", 12, 6),
             768: ("vit_base_patch16_224", 12, 12), 1024: ("vit_large_patch16_224", 24, 16)}


def full_state_dict(ckpt: str) -> dict:
    """The fp32 state dict of the whole CIM module from a DeepSpeed checkpoint folder."""
    files = sorted(glob.glob(os.path.join(ckpt, "*mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*mp_rank_00_model_states.pt)")
    checkpoint.verify_files(ckpt)  # before zero_to_fp32's unrestricted load
    with torch.serialization.safe_globals(checkpoint._deepspeed_state_types()):
        states = torch.load(files[0], map_location="cpu", weights_only=True)
    if states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt), tag=os.path.basename(ckpt))
    return {k: v.float() for k, v in states["module"].items()}


def enhancer_state_dict(full: dict, enhancer: str) -> dict:
    """Strip the CIM wrapper: ``enhancer.backbone.*`` (ViT) or ``enhancer.*`` (ResNet), no heads."""
    prefix = "enhancer.backbone." if enhancer == "vit" else "enhancer."
    out = {k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(("neck.", "head."))}


def timm_spec(cfg: dict) -> tuple[str | None, dict]:
    """(timm model name, keyword arguments) that build the enhancer's architecture in timm."""
    if cfg["enhancer"] == "resnet":
        ok = tuple(cfg["resnet_layers"]) == (3, 4, 6, 3) and cfg["resnet_width"] == 64 and cfg["img_size"] == 224
        return ("resnet50", {}) if ok else (None, {})
    if cfg["enhancer_dim"] not in TIMM_VITS:
        return None, {}
    name, depth, heads = TIMM_VITS[cfg["enhancer_dim"]]
    kwargs = {}
    if cfg["img_size"] != 224:
        kwargs["img_size"] = cfg["img_size"]
    if cfg["patch_size"] != 16:
        kwargs["patch_size"] = cfg["patch_size"]
    if cfg["enhancer_depth"] != depth:
        kwargs["depth"] = cfg["enhancer_depth"]
    if cfg["enhancer_heads"] != heads:
        kwargs["num_heads"] = cfg["enhancer_heads"]
    return name, kwargs


def create_model_line(name: str, kwargs: dict) -> str:
    """The one line of Python that builds the exported model in timm."""
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({name!r}, num_classes=0{args})"


def export(ckpt: str, out: str) -> dict:
    if os.path.isdir(os.path.join(ckpt, "checkpoints")):
        latest = checkpoint.latest_checkpoint(ckpt)
        if latest is None:
            raise FileNotFoundError(f"{ckpt} has no finished checkpoint")
        ckpt = latest
    state = checkpoint.read_state(ckpt)
    cfg = state["config"]
    sd = enhancer_state_dict(full_state_dict(ckpt), cfg["enhancer"])
    if not sd:
        raise RuntimeError(f"no enhancer weights found in {ckpt}")
    name, kwargs = timm_spec(cfg)
    meta = {"cimfast_preset": cfg["preset"], "timm_model": name or "", "timm_kwargs": json.dumps(kwargs),
            "timm_create": create_model_line(name, kwargs) if name else "",
            "step": str(state["step"]), "img_size": str(cfg["img_size"]), "patch_size": str(cfg["patch_size"]),
            "config": json.dumps({k: cfg[k] for k in ("enhancer", "enhancer_dim", "enhancer_depth", "enhancer_heads",
                                                      "resnet_layers", "resnet_width", "objective")})}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, out, metadata=meta)
    return {"path": out, "tensors": len(sd), "timm_model": name, "timm_create": meta["timm_create"],
            "step": state["step"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cimfast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder or output directory")
    p.add_argument("out", help="output .safetensors file")
    a = p.parse_args(argv)
    try:
        info = export(a.checkpoint, a.out)
    except (InputError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"cimfast.export: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    print(f"wrote {info['tensors']} tensors (step {info['step']}) to {info['path']}")
    if info["timm_create"]:
        print("load it with:\n"
              "    import timm, safetensors.torch\n"
              f"    model = {info['timm_create']}\n"
              f"    model.load_state_dict(safetensors.torch.load_file({info['path']!r}), strict=True)")
    else:
        print("timm has no model of this architecture under a known name: load it into one of the same shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
