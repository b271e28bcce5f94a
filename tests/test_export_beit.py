"""``cimfast.export --layout beit``: the enhancer under BEiT's names (q_bias/v_bias)."""
import json
import os
from dataclasses import asdict

import pytest
import torch

from cimfast.config.settings import Config
from cimfast.export import main
from cimfast.models.timm_names import beit_state_dict, create_model_line, timm_spec
from cimfast.models.vit import ViTEnhancer

timm = pytest.importorskip("timm")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def random_enhancer(cfg: dict) -> ViTEnhancer:
    """An enhancer with every parameter away from its init: the biases (the key
    bias too) are zero at init, which would make the comparisons below vacuous."""
    m = ViTEnhancer(cfg["img_size"], cfg["patch_size"], cfg["enhancer_dim"], cfg["enhancer_depth"],
                    cfg["enhancer_heads"], "respix").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def build(cfg: dict, layout: str):
    """The timm model exactly as the export command prints it for ``cfg``."""
    name, kwargs = timm_spec(cfg, layout)
    return eval(create_model_line(name, kwargs), {"timm": timm}).eval()


def features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


SMALL = {"enhancer": "vit", "img_size": 32, "patch_size": 16, "enhancer_dim": 192, "enhancer_depth": 2,
         "enhancer_heads": 3}


def test_beit_layout_matches_timm_vit():
    enh = random_enhancer(SMALL)
    sd = enh.timm_state_dict()
    bsd = beit_state_dict(sd)
    D = SMALL["enhancer_dim"]
    # (c) q_bias / v_bias are the first and last D of qkv.bias; the k part (non-zero here) is dropped
    for i in range(SMALL["enhancer_depth"]):
        qkv = sd[f"blocks.{i}.attn.qkv.bias"]
        assert qkv[D:2 * D].abs().min() > 0
        assert torch.equal(bsd[f"blocks.{i}.attn.q_bias"], qkv[:D])
        assert torch.equal(bsd[f"blocks.{i}.attn.v_bias"], qkv[2 * D:])
        assert f"blocks.{i}.attn.qkv.bias" not in bsd
    assert set(bsd) - {k for k in bsd if k.endswith(("q_bias", "v_bias"))} == \
        {k for k in sd if not k.endswith("qkv.bias")}

    # (a) strict load into timm's Beit (abs pos emb, no rel pos bias, no layer scale, token pooling)
    beit = build(SMALL, "beit")
    assert beit.pos_embed is not None and beit.blocks[0].attn.relative_position_bias_table is None
    assert beit.blocks[0].gamma_1 is None and beit.rel_pos_bias is None
    beit.load_state_dict(bsd, strict=True)
    vit = build(SMALL, "timm")
    vit.load_state_dict(sd, strict=True)

    # (b) the same features as timm's VisionTransformer (and cimfast's backbone): the k bias cancels
    x = torch.randn(2, 3, SMALL["img_size"], SMALL["img_size"])
    ref = features(vit, x)
    with torch.no_grad():
        own = enh.backbone.forward_tokens(enh.backbone.patch_embed(x))
    torch.testing.assert_close(own, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features(beit, x), ref, atol=1e-5, rtol=1e-5)

    # the comparison can fail: BEiT's zero-initialized v_bias (what a non-strict load of a
    # timm-layout file leaves) changes the features
    beit.load_state_dict({k: torch.zeros_like(v) if k.endswith("v_bias") else v for k, v in bsd.items()})
    assert (features(beit, x) - ref).abs().max() > 1e-2


def test_timm_line_and_beit_kwargs():
    name, kwargs = timm_spec({**SMALL, "img_size": 224, "enhancer_depth": 12, "enhancer_heads": 12,
                              "enhancer_dim": 768}, "beit")
    assert create_model_line(name, kwargs) == (
        "timm.create_model('beit_base_patch16_224', num_classes=0, use_abs_pos_emb=True, "
        "use_rel_pos_bias=False, init_values=0, global_pool='token')")
    assert timm_spec({**SMALL, "img_size": 224, "enhancer_depth": 24, "enhancer_heads": 16,
                      "enhancer_dim": 1024}, "beit")[0] == "beit_large_patch16_224"


def write_checkpoint(tmp_path, preset: str, module: dict) -> str:
    """A ZeRO-0 checkpoint folder as DeepSpeed and checkpoint.save lay it out (no training run)."""
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    cfg = asdict(Config(preset=preset).resolve())
    (ckpt / "cimfast_state.json").write_text(json.dumps({"config": cfg, "step": 3}))
    torch.save({"module": module, "ds_config": {"zero_optimization": {"stage": 0}}},
               ckpt / "mp_rank_00_model_states.pt")
    return str(ckpt)


def test_export_command_beit(tmp_path, capsys):
    cfg = asdict(Config(preset="tiny").resolve())
    enh = random_enhancer(cfg)
    module = {f"enhancer.{k}": v for k, v in enh.state_dict().items()}
    module["generator.backbone.norm.weight"] = torch.ones(3)
    write_checkpoint(tmp_path, "tiny", module)
    out = str(tmp_path / "enh.safetensors")
    assert main([str(tmp_path), out, "--layout", "beit"]) == 0
    printed = capsys.readouterr().out
    line = ("timm.create_model('beit_base_patch16_224', num_classes=0, use_abs_pos_emb=True, use_rel_pos_bias=False, "
            "init_values=0, global_pool='token', embed_dim=192, img_size=112, depth=4, num_heads=3)")
    assert f"model = {line}" in printed
    flags = (f"--model beit_base_patch16_224 --finetune {out[:-len('.safetensors')]}.pth --input_size 112 "
             "--abs_pos_emb --disable_rel_pos_bias --layer_scale_init_value 0")
    assert flags in printed and "--use_mean_pooling" in printed
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["layout"] == "beit" and meta["timm_create"] == line and meta["beit_flags"] == flags
    beit = eval(meta["timm_create"], {"timm": timm}).eval()
    beit.load_state_dict(load_file(out), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        own = enh.backbone.forward_tokens(enh.backbone.patch_embed(x))
    torch.testing.assert_close(features(beit, x), own, atol=1e-5, rtol=1e-5)


def test_beit_layout_refuses_resnet(tmp_path, capsys):
    write_checkpoint(tmp_path, "tiny-resnet", {"enhancer.conv1.weight": torch.zeros(1)})
    out = tmp_path / "r.safetensors"
    assert main([str(tmp_path), str(out), "--layout", "beit"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--layout beit needs a ViT enhancer" in err
    assert not os.path.exists(out)
