import pytest
import torch

from cimfast.models.attention import _xformers_works, attention, attention_math, backend, set_backend
from cimfast.models.resnet import ResNetEnhancer
from cimfast.models.vit import BEiTGenerator, ViTEnhancer, patchify, unpatchify


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 6, 768)
    y = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(y, 16), 16), y)


@pytest.mark.parametrize("objective,out", [("respix", 16 * 16 * 3), ("revdet", 1)])
def test_vit_enhancer_shapes(objective, out):
    m = ViTEnhancer(64, 16, 32, 2, 2, objective)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 16, out)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        m(torch.randn(2, 1, 64, 64))


@pytest.mark.parametrize("objective,out", [("respix", 16 * 16 * 3), ("revdet", 1)])
def test_resnet_enhancer_shapes(objective, out):
    for size in (64, 112):
        m = ResNetEnhancer(size, 16, objective, layers=(1, 1, 1, 1), width=8, neck_dim=16)
        assert m(torch.randn(2, 3, size, size)).shape == (2, (size // 16) ** 2, out)


def test_generator_uses_mask_token():
    g = BEiTGenerator(64, 16, 32, 2, 2, vocab_size=50).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    logits = g(x, mask)
    assert logits.shape == (10, 50)
    # masked content is invisible to the generator
    x2 = x.clone()
    x2[:, :, :16, :16] += 5  # patch 0 is masked
    assert torch.allclose(g(x2, mask), logits, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        g(x, torch.zeros(2, 15, dtype=torch.bool))


def test_timm_names_match():
    timm = pytest.importorskip("timm")
    m = ViTEnhancer(224, 16, 192, 2, 3, "respix")
    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0)
    t.load_state_dict(m.timm_state_dict(), strict=True)
    r = ResNetEnhancer(224, 16, "revdet")
    tr = timm.create_model("resnet50", pretrained=False, num_classes=0)
    tr.load_state_dict(r.timm_state_dict(), strict=True)


@pytest.mark.parametrize("name", ["sdpa", "math"] + (["xformers"] if torch.cuda.is_available() else []))
def test_attention_backends_agree_with_math(name):
    """Every backend this machine can run agrees with math attention, forward and backward."""
    dev = "cuda" if name == "xformers" else "cpu"
    if name == "xformers" and not _xformers_works(torch.device(dev), torch.float32):
        # PyPI's xformers 0.0.35 has no CUDA ops of its own (built for torch 2.10+cu128: on an H200 with
        # torch 2.11+cu130 no operator took the call); training then runs on SDPA, and says so
        pytest.skip("xformers attention does not run here in float32 (its probe failed: the captured log says why)")
    q, k, v = (torch.randn(2, 3, 10, 8, device=dev, requires_grad=True) for _ in range(3))
    ref = attention_math(q, k, v)
    try:
        set_backend(name)
        out = attention(q, k, v)
    finally:
        set_backend(None)
    assert torch.allclose(out, ref, atol=1e-5)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g_ref, g_out):
        assert torch.allclose(a, b, atol=1e-5)


def test_attention_choice_and_errors(monkeypatch):
    set_backend(None)
    assert backend(torch.device("cpu"), torch.float32) == "sdpa"  # no xformers on a CPU
    monkeypatch.setenv("CIMFAST_ATTENTION", "math")
    assert backend(torch.device("cpu"), torch.float32) == "math"
    monkeypatch.setenv("CIMFAST_ATTENTION", "flash9000")
    with pytest.raises(ValueError, match="choose one of"):
        backend(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="choose one of"):
        set_backend("flash9000")


def test_checkpointed_blocks_give_the_same_gradients():
    torch.manual_seed(0)
    plain = ViTEnhancer(64, 16, 32, 3, 2, "respix")
    ckpt = ViTEnhancer(64, 16, 32, 3, 2, "respix", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (plain, ckpt):
        m(x).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
