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

import json
import os
import sys

from safetensors.torch import save_file

from cimfast.config.cli import Parser
from cimfast.config.settings import InputError
from cimfast.engine import checkpoint
from cimfast.engine.checkpoint import full_state_dict

# timm's ViT of each width: (name, its depth, its heads); other depths, heads,
# image and patch sizes are passed to timm.create_model as keyword arguments.
from cimfast.models.timm_names import beit_flags, beit_state_dict, create_model_line, enhancer_state_dict, timm_spec


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


def build_parser() -> Parser:
    p = Parser(prog="cimfast.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint folder or output directory")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--layout", choices=("timm", "beit"), default="timm",
                   help="parameter names: timm's VisionTransformer (default) or BEiT's (q_bias/v_bias; ViT only)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
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
