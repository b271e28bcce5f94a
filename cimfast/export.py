"""Export the enhancer of a checkpoint as a timm state dict (safetensors).

    python -m cimfast.export CHECKPOINT OUT.safetensors

CHECKPOINT is a checkpoint folder (``<output_dir>/checkpoints/step_N``) or an
output directory (its latest checkpoint). ZeRO-1/2/3 checkpoints are merged
with DeepSpeed's zero_to_fp32; the names and shapes are timm's
``vit_*_patch16_224`` / ``resnet50`` ones, so
``timm.create_model(name, num_classes=0).load_state_dict(sd, strict=True)``
works (the CIM heads are left out).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from cimfast import checkpoint

TIMM_NAMES = {("vit", 384, 12): "vit_small_patch16_224", ("vit", 768, 12): "vit_base_patch16_224",
              ("vit", 1024, 24): "vit_large_patch16_224", ("vit", 192, 12): "vit_tiny_patch16_224"}


def full_state_dict(ckpt: str) -> dict:
    """The fp32 state dict of the whole CIM module from a DeepSpeed checkpoint folder."""
    files = sorted(glob.glob(os.path.join(ckpt, "*mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states (*mp_rank_00_model_states.pt)")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt), tag=os.path.basename(ckpt))
    return {k: v.float() for k, v in states["module"].items()}


def enhancer_state_dict(full: dict, enhancer: str) -> dict:
    """Strip the CIM wrapper: ``enhancer.backbone.*`` (ViT) or ``enhancer.*`` (ResNet), no heads."""
    prefix = "enhancer.backbone." if enhancer == "vit" else "enhancer."
    out = {k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith(("neck.", "head."))}


def timm_name(cfg: dict) -> str | None:
    if cfg["enhancer"] == "resnet":
        return "resnet50" if tuple(cfg["resnet_layers"]) == (3, 4, 6, 3) and cfg["resnet_width"] == 64 else None
    return TIMM_NAMES.get(("vit", cfg["enhancer_dim"], cfg["enhancer_depth"]))


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
    from safetensors.torch import save_file

    name = timm_name(cfg)
    meta = {"cimfast_preset": cfg["preset"], "timm_model": name or "", "step": str(state["step"]),
            "img_size": str(cfg["img_size"]), "patch_size": str(cfg["patch_size"]),
            "config": json.dumps({k: cfg[k] for k in ("enhancer", "enhancer_dim", "enhancer_depth", "enhancer_heads",
                                                      "resnet_layers", "resnet_width", "objective")})}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, out, metadata=meta)
    return {"path": out, "tensors": len(sd), "timm_model": name, "step": state["step"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cimfast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder or output directory")
    p.add_argument("out", help="output .safetensors file")
    a = p.parse_args(argv)
    try:
        info = export(a.checkpoint, a.out)
    except (FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"cimfast.export: {e}", file=sys.stderr)
        return 1
    hint = f"timm.create_model('{info['timm_model']}', num_classes=0)" if info["timm_model"] else "a timm model of the same size"
    print(f"wrote {info['tensors']} tensors (step {info['step']}) to {info['path']}; load with {hint}"
          f".load_state_dict(safetensors.torch.load_file(path), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
