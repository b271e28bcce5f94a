"""Export the enhancer of a checkpoint as a timm state dict (safetensors).

    python -m cimfast.export CHECKPOINT OUT.safetensors [--layout {timm,beit}]

CHECKPOINT is a checkpoint folder (``<output_dir>/checkpoints/step_N``) or an
output directory (its latest checkpoint). ZeRO-1/2/3 checkpoints are merged
with DeepSpeed's zero_to_fp32 (every file read with ``weights_only=True``
first); the names and shapes are timm's ``vit_*_patch16_224`` / ``resnet50``
ones. The file's metadata names the timm model and its keyword arguments
(``timm_model``, ``timm_kwargs``, ``timm_create``), and the command prints
the line that loads it (the CIM heads are left out).

``--layout beit`` (ViT only) writes the names of BEiT (timm's ``Beit``,
microsoft/unilm's beit): q_bias/v_bias instead of qkv.bias, see
``beit_state_dict``; it prints the timm line and BEiT's fine-tuning flags.
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
from cimfast.cli import Parser
from cimfast.config import InputError

# timm's ViT of each width: (name, its depth, its heads); other depths, heads,
# image and patch sizes are passed to timm.create_model as keyword arguments.
TIMM_VITS = {192: ("vit_tiny_patch16_224", 12, 3), 384: ("vit_small_patch16_224", 12, 6),
             768: ("vit_base_patch16_224", 12, 12), 1024: ("vit_large_patch16_224", 24, 16)}
# timm (and BEiT) name a BEiT of two widths only; other widths pass embed_dim.
TIMM_BEITS = {768: ("beit_base_patch16_224", 12, 12), 1024: ("beit_large_patch16_224", 24, 16)}
# The enhancer is a plain ViT: absolute positions, no relative position bias,
# no layer scale (init_values=0: timm.create_model drops None arguments, which
# would keep beit_*'s 0.1); global_pool='token' keeps ``norm`` (with 'avg'
# timm's Beit replaces it by a fresh ``fc_norm`` and a strict load fails).
BEIT_KWARGS = {"use_abs_pos_emb": True, "use_rel_pos_bias": False, "init_values": 0, "global_pool": "token"}


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


def beit_state_dict(sd: dict) -> dict:
    """timm ViT names -> BEiT's: each ``blocks.i.attn.qkv.bias`` [3D] becomes
    ``blocks.i.attn.q_bias`` (its first D) and ``v_bias`` (its last D); every
    other name is the same in both. BEiT has no key bias, and needs none: a
    bias b_k on the keys adds q.b_k to every logit of query q's row, the same
    constant for all keys, which the softmax cancels."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".attn.qkv.bias"):
            q, _, v_ = v.chunk(3)
            # clones: safetensors refuses tensors that share storage
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q.clone(), v_.clone()
        else:
            out[k] = v
    return out


def timm_spec(cfg: dict, layout: str = "timm") -> tuple[str | None, dict]:
    """(timm model name, keyword arguments) that build the enhancer's architecture in timm."""
    if cfg["enhancer"] == "resnet":
        ok = tuple(cfg["resnet_layers"]) == (3, 4, 6, 3) and cfg["resnet_width"] == 64 and cfg["img_size"] == 224
        return ("resnet50", {}) if ok else (None, {})
    if layout == "beit":
        dim = 1024 if cfg["enhancer_dim"] == 1024 else 768
        (name, depth, heads), kwargs = TIMM_BEITS[dim], dict(BEIT_KWARGS)
        if cfg["enhancer_dim"] != dim:
            kwargs["embed_dim"] = cfg["enhancer_dim"]
    elif cfg["enhancer_dim"] in TIMM_VITS:
        (name, depth, heads), kwargs = TIMM_VITS[cfg["enhancer_dim"]], {}
    else:
        return None, {}
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


def beit_flags(name: str, kwargs: dict, path: str) -> str:
    """The flags of BEiT's own run_class_finetuning.py (which reads a .pth) for the exported file."""
    size = f" --input_size {kwargs['img_size']}" if "img_size" in kwargs else ""
    return (f"--model {name} --finetune {os.path.splitext(path)[0]}.pth{size} "
            "--abs_pos_emb --disable_rel_pos_bias --layer_scale_init_value 0")


def export(ckpt: str, out: str, layout: str = "timm") -> dict:
    if os.path.isdir(os.path.join(ckpt, "checkpoints")):
        latest = checkpoint.latest_checkpoint(ckpt)
        if latest is None:
            raise FileNotFoundError(f"{ckpt} has no finished checkpoint")
        ckpt = latest
    state = checkpoint.require_job(ckpt, "cim", "checkpoint")  # fine-tuning: a whole timm classifier
    cfg = state["config"]
    if layout == "beit" and cfg["enhancer"] != "vit":
        raise InputError(f"--layout beit needs a ViT enhancer; {ckpt} holds a {cfg['enhancer']} one")
    sd = enhancer_state_dict(full_state_dict(ckpt), cfg["enhancer"])
    if not sd:
        raise RuntimeError(f"no enhancer weights found in {ckpt}")
    if layout == "beit":
        sd = beit_state_dict(sd)
    name, kwargs = timm_spec(cfg, layout)
    meta = {"cimfast_preset": cfg["preset"], "layout": layout, "timm_model": name or "",
            "timm_kwargs": json.dumps(kwargs), "timm_create": create_model_line(name, kwargs) if name else "",
            "beit_flags": beit_flags(name, kwargs, out) if layout == "beit" else "",
            "step": str(state["step"]), "img_size": str(cfg["img_size"]), "patch_size": str(cfg["patch_size"]),
            "config": json.dumps({k: cfg[k] for k in ("enhancer", "enhancer_dim", "enhancer_depth", "enhancer_heads",
                                                      "resnet_layers", "resnet_width", "objective")})}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, out, metadata=meta)
    return {"path": out, "tensors": len(sd), "timm_model": name, "timm_create": meta["timm_create"],
            "timm_kwargs": kwargs, "beit_flags": meta["beit_flags"], "step": state["step"]}


def main(argv=None) -> int:
    p = Parser(prog="cimfast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder or output directory")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--layout", choices=("timm", "beit"), default="timm",
                   help="parameter names: timm's VisionTransformer (default) or BEiT's (q_bias/v_bias; ViT only)")
    a = p.parse_args(argv)
    try:
        info = export(a.checkpoint, a.out, a.layout)
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
    if info["beit_flags"]:
        pth = os.path.splitext(info["path"])[0] + ".pth"
        odd = {k: v for k, v in info["timm_kwargs"].items() if k in ("embed_dim", "depth", "num_heads", "patch_size")}
        print(f"for BEiT's run_class_finetuning.py: torch.save(safetensors.torch.load_file({info['path']!r}), "
              f"{pth!r}), then\n    {info['beit_flags']}\n"
              "(its default --use_mean_pooling pools into a fresh fc_norm and leaves the exported norm unused; "
              "--use_cls keeps norm and the [CLS] token)")
        if odd:
            print(f"BEiT's modeling_finetune.py has no model with {odd}: register one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
