"""timm's (and BEiT's) names for the enhancer: the model to create and the
state-dict layout an export writes."""
from __future__ import annotations

import os

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
