"""torch.compile of the trained networks and of the whole CIM step (CPU: the
aot_eager backend checks graph capture and autograd without a C++ build; the
GPU check runs inductor)."""
import pytest
import torch

from cimfast.config.settings import Config
from cimfast.models.vit import BEiTGenerator, ViTEnhancer
from cimfast.objective.cim import CIMModel
from cimfast.objective.masking import BlockMaskGenerator
from cimfast.tokenizer.model import TINY_SPEC, Tokenizer


def _batch(cfg, n=4):
    g = torch.Generator().manual_seed(0)
    masks = BlockMaskGenerator(cfg.grid, cfg.num_masked, cfg.min_block).batch(range(n))
    return (torch.rand(n, 3, cfg.img_size, cfg.img_size, generator=g),
            torch.rand(n, 3, cfg.tok_size, cfg.tok_size, generator=g),
            torch.from_numpy(masks), torch.arange(n))


def test_networks_compile_without_graph_breaks():
    torch._dynamo.reset()
    gen = BEiTGenerator(64, 16, 32, 2, 2, vocab_size=40)
    enh = ViTEnhancer(64, 16, 32, 2, 2, "respix")
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    pos = torch.nonzero_static(mask.reshape(-1), size=12).squeeze(1)
    g_c = torch.compile(gen, fullgraph=True, backend="aot_eager")
    e_c = torch.compile(enh, fullgraph=True, backend="aot_eager")
    assert torch.allclose(g_c(x, mask, pos), gen(x, mask, pos), atol=1e-5)
    assert torch.allclose(e_c(x), enh(x), atol=1e-5)


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_compiled_step_equals_eager(objective):
    torch._dynamo.reset()
    cfg = Config(preset="tiny", objective=objective).resolve()
    torch.manual_seed(0)
    tok = Tokenizer(TINY_SPEC)
    eager = CIMModel(cfg, tok)
    compiled = CIMModel(cfg, tok)
    compiled.load_state_dict(eager.state_dict())
    batch = _batch(cfg)
    eager(*batch)  # the one-time mask check runs eagerly
    compiled(*batch)
    step = torch.compile(compiled, backend="aot_eager")
    a, b = eager(*batch), step(*batch)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)
    a["loss"].backward()
    b["loss"].backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_compiled_step_keeps_the_triton_ops_inside_one_graph(objective, monkeypatch):
    """The whole step compiles to one graph (fullgraph: a break is an error) that calls
    the fused ops as custom ops, forward and backward: no break around them, and not
    left out for their references."""
    monkeypatch.setenv("CIMFAST_KERNELS", "triton")  # the kernels, in Triton's interpreter on a CPU
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = Config(preset="tiny", objective=objective).resolve()
    model = CIMModel(cfg, Tokenizer(TINY_SPEC))
    batch = _batch(cfg)
    eager = model(*batch)
    out = torch.compile(model, backend=backend, fullgraph=True)(*batch)
    assert len(graphs) == 1
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    expected = {"cimfast.sample_ce"} | ({"cimfast.window_norm_loss"} if objective == "respix" else set())
    assert expected <= ops, sorted(o for o in ops if "cimfast" in o)
    assert torch.allclose(out["loss"], eager["loss"], atol=1e-5)
    out["loss"].backward()  # through the custom ops' registered backward
    assert model.generator.head.weight.grad is not None
    assert any(p.grad is not None for p in model.enhancer.parameters())
