import pytest
import torch

from cimfast.config.settings import Config, ConfigError, from_dict
from cimfast.objective.cim import CIMModel, build_tokenizer
from cimfast.objective.diagnostics import CodeMarginal
from cimfast.objective.masking import BlockMaskGenerator
from cimfast.pipelines.datasets import DemoDataset
from cimfast.tokenizer.files import TokenizerFileError


def _setup(preset="tiny", objective="respix", **kw):
    cfg = Config(preset=preset, objective=objective, **kw).resolve()
    model = CIMModel(cfg, build_tokenizer(cfg))
    ds = DemoDataset(cfg.img_size, cfg.tok_size, samples=256,
                     mask_fn=BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block))
    return cfg, model, ds


def _batch(ds, idx, epoch=0):
    items = [ds[(epoch, i)] for i in idx]
    b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return b["images"], b["images_tok"], b["mask"], b["sample_key"]


@pytest.mark.parametrize("preset,objective", [("tiny", "respix"), ("tiny", "revdet"),
                                              ("tiny-resnet", "respix"), ("tiny-resnet", "revdet")])
def test_step_forward_backward(preset, objective):
    cfg, model, ds = _setup(preset, objective)
    out = model(*_batch(ds, range(4)), return_visuals=True)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["gen_loss"] + cfg.enhancer_weight * out["enh_loss"])
    assert all(p.grad is not None for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.enhancer.parameters())
    # the tokenizer is frozen and not part of the trainable module
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
    assert not any(k.startswith("tokenizer") or "_frozen" in k for k in model.state_dict())
    vis = out["visuals"]
    assert vis["original"].shape == vis["corrupted"].shape == (4, 3, cfg.img_size, cfg.img_size)
    assert vis["replaced"].shape == (4, cfg.grid, cfg.grid)
    assert 0 <= float(out["replaced_frac"]) <= 1


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_no_gradient_crosses_sampling(objective):
    """The enhancer's loss gives the generator no gradient: the generator's
    gradient is the same whatever the enhancer's weight."""
    cfg, model, ds = _setup("tiny", objective)
    batch = _batch(ds, range(2))
    grads = []
    for w in (0.0, 3.0):
        model.cfg.enhancer_weight = w
        out = model(*batch)
        grads.append(torch.autograd.grad(out["loss"], list(model.generator.parameters())))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_fifty_steps_lower_both_losses(objective):
    torch.manual_seed(0)
    cfg, model, ds = _setup("tiny", objective)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
    gen, enh = [], []
    marginal = CodeMarginal(512, torch.device("cpu"))
    for step in range(50):
        batch = _batch(ds, [(step * 8 + j) % len(ds) for j in range(8)])
        out = model(*batch)
        marginal.add(out["code_counts"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        gen.append(float(out["gen_loss"]))
        enh.append(float(out["enh_loss"]))
    first = lambda v: sum(v[:5]) / 5
    last = lambda v: sum(v[-5:]) / 5
    assert last(gen) < 0.92 * first(gen), gen
    # below the entropy of the codes: more than a generator that only learned their frequencies
    assert last(gen) < marginal.report(1)["gen_loss_trivial"], gen
    assert last(enh) < 0.95 * first(enh), enh


def test_bad_inputs_name_the_problem():
    cfg, model, ds = _setup()
    x, xt, m, k = _batch(ds, range(2))
    with pytest.raises(ValueError, match="enhancer size"):
        model(x[:, :, :64], xt, m, k)
    with pytest.raises(ValueError, match="RGB"):
        model(x[:, :1], xt, m, k)
    with pytest.raises(ValueError, match="tokenizer view"):
        model(x, x, m, k)
    with pytest.raises(ValueError, match="mask"):
        model(x, xt, m[:, :10], k)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_masked"):
        Config(preset="tiny", num_masked=50).resolve()
    with pytest.raises(ConfigError, match="objective"):
        Config(objective="mae").resolve()
    with pytest.raises(ConfigError, match="preset"):
        Config(preset="huge").resolve()
    with pytest.raises(ConfigError, match="unknown key.*windw"):
        from_dict(Config, {"windw": 3})
    with pytest.raises(ConfigError, match="window: expected int"):
        from_dict(Config, {"window": "9"})
    assert from_dict(Config, {"temperature": 2}).temperature == 2.0


def test_dalle_preset_without_tokenizer_says_what_to_download():
    cfg = Config(preset="base").resolve()
    with pytest.raises(TokenizerFileError, match="encoder.pkl and decoder.pkl"):
        build_tokenizer(cfg)


def test_mask_with_wrong_count_is_refused():
    cfg, model, ds = _setup()
    x, xt, m, k = _batch(ds, range(2))
    model(x, xt, m, k)  # a good batch first: every batch is checked, not only the first
    m = m.clone()
    m[0, m[0].nonzero()[0]] = False
    # checked on the device (torch._assert_async): on the CPU it raises at once
    with pytest.raises(RuntimeError, match="exactly num_masked=20"):
        model(x, xt, m, k)
