"""Sampling + cross-entropy: the reference's properties, tested once over both
implementations (the PyTorch reference and the fused kernel), the kernel
against the reference, and the dispatch point.

Without a GPU the kernel runs in Triton's interpreter, which must be switched
on before triton is first imported: this module sets TRITON_INTERPRET=1 before
importing cimfast.kernels. If another module imported the kernels first
without it, the kernel tests skip and say so (export TRITON_INTERPRET=1 for
the pytest run to avoid that). Shapes stay tiny: the interpreter runs one
program after another.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cimfast.kernels import dispatch  # noqa: E402
from cimfast.kernels.sampling import (
    hash32,
    row_keys,
    row_keys_at,
    sample_ce,
    sample_ce_reference,
    sample_ce_triton,
    sample_replace,
    sample_replace_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not dispatch.HAS_TRITON or (DEVICE == "cpu" and not dispatch.INTERPRETER),
    reason="needs CUDA, or TRITON_INTERPRET=1 set before triton was first imported in this process")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tolerances. Loss: both sides compute log-sum-exp in fp32 from the same
# (upcast) logits, only in a different order. Gradient: compared with the
# reference's fp32 gradient for the same (upcast) logits. fp32: rounding only.
# bf16 logits get a bf16 gradient, rounded twice (the stored softmax - onehot,
# then its product with the upstream gradient). The GPU rounds to nearest (2
# half-ulps = 2**-7 at most); Triton's interpreter casts fp32 -> bf16 by
# truncation (up to a whole ulp, 2**-7, each time): 2**-6 covers both.
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=2**-6, atol=1e-6)}


def _batch(M, V, B=2, N=None, dtype=torch.float32, seed=0, scale=3.0):
    """Logits for exactly M masked positions of a [B, N] id map."""
    g = torch.Generator().manual_seed(seed)
    N = N or max(1, (2 * M + B - 1) // B)
    mask = torch.zeros(B * N, dtype=torch.bool)
    mask[torch.randperm(B * N, generator=g)[:M]] = True
    mask = mask.reshape(B, N)
    ids = torch.randint(0, V, (B, N), generator=g)
    logits = torch.randn(M, V, generator=g) * scale
    # some rows with their original id on top, so that `correct` is not all False
    logits[::2].scatter_(1, ids[mask][::2, None], 100.0)
    keys = torch.randint(0, 2**32, (B,), generator=g)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(logits.to(dtype)), to(ids), to(mask), to(keys)


def _both(logits, ids, mask, keys, T=1.0, **launch):
    """(kernel, reference) results and gradients for a random upstream gradient;
    the reference runs on the fp32 upcast (it upcasts anyway) for an fp32 gradient."""
    w = torch.randn(logits.shape[0], generator=torch.Generator().manual_seed(1)).to(logits.device)
    out = []
    for fn, dtype in ((lambda *a: sample_ce_triton(*a, **launch), logits.dtype), (sample_ce_reference, torch.float32)):
        x = logits.detach().to(dtype).requires_grad_()
        res = fn(x, ids, mask, keys, T)
        (res.loss_rows * w).sum().backward()
        out.append((res, x.grad))
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,V,block_v,rows", [
    (1, 37, 0, 0),      # one row, V smaller than a block
    (5, 37, 16, 2),     # several chunks, a ragged last chunk and a ragged last program
    (5, 300, 128, 0),   # V=300 over BLOCK 128: 2 full chunks + 44
    (40, 300, 128, 16), # several programs, last one partly empty
])
def test_forward_backward_match_reference(M, V, block_v, rows, dtype):
    logits, ids, mask, keys = _batch(M, V, dtype=dtype)
    (k, gk), (r, gr) = _both(logits, ids, mask, keys, block_v=block_v, rows_per_program=rows)
    torch.testing.assert_close(k.loss_rows, r.loss_rows, **LOSS_TOL)
    assert k.loss_rows.dtype == torch.float32
    assert torch.equal(k.corrupted, r.corrupted)
    assert torch.equal(k.replaced, r.replaced) and k.replaced.dtype == torch.float32
    assert torch.equal(k.correct, r.correct) and k.correct.any()
    assert gk.dtype == dtype
    torch.testing.assert_close(gk.float(), gr, **GRAD_TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("T", [1.0, 0.7, 2.0])
def test_draws_equal_reference_draws(T):
    # The kernel recomputes the reference's counter-based noise bit for bit
    # (integer hash, exact 24-bit uniform). Only the two logs and the division
    # by T may round differently (NumPy or GPU math vs PyTorch's), which can
    # flip a draw only where the top two scores tie to within an ulp; allow
    # 0.5 % of rows for that, far above what such near-ties produce.
    logits, ids, mask, keys = _batch(M=512, V=1000, B=8, N=100, scale=1.0, seed=3)
    with torch.no_grad():
        k = sample_ce_triton(logits, ids, mask, keys, T)
        corrupted, replaced = sample_replace_reference(logits, ids, mask, keys, T)
    differ = (k.corrupted != corrupted)[mask].float().mean().item()
    assert differ <= 0.005, differ
    assert torch.equal(k.replaced, ((k.corrupted != ids) & mask).float())


def _reference(logits, ids, mask, keys, T=1.0, **launch):
    return sample_ce_reference(logits, ids, mask, keys, T, positions=launch.get("positions"))


IMPLS = [pytest.param(_reference, id="reference"), pytest.param(sample_ce_triton, id="triton", marks=needs_kernels)]


def test_hash32_matches_uint32_arithmetic():
    xs = np.array([0, 1, 2, 12345, 2**31, 2**32 - 1], dtype=np.uint64)

    def ref(x):
        x = int(x)
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    got = hash32(torch.tensor(xs.astype(np.int64)))
    assert got.tolist() == [ref(x) for x in xs]


@pytest.mark.parametrize("impl", IMPLS)
def test_draws_follow_softmax(impl):
    V, rows = 6, 30000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]]).repeat(rows, 1).to(DEVICE)
    ids = torch.zeros(rows, 1, dtype=torch.long, device=DEVICE)
    mask = torch.ones(rows, 1, dtype=torch.bool, device=DEVICE)
    keys = (torch.arange(rows) * 7919 + 13).to(DEVICE)  # fixed: the test cannot flake
    for T in (1.0, 2.0):
        with torch.no_grad():
            out = impl(logits, ids, mask, keys, T, rows_per_program=256)
        freq = torch.bincount(out.corrupted[:, 0].cpu(), minlength=V).double() / rows
        p = torch.softmax(logits[0].cpu().double() / T, 0)
        chi2 = (((freq - p) ** 2) / p).sum() * rows
        assert chi2 < 20.5, (T, chi2)  # 99.9 % quantile of chi2 with 5 dof


@pytest.mark.parametrize("impl", IMPLS)
def test_same_keys_same_draws_and_unmasked_untouched(impl):
    logits, ids, mask, keys = _batch(M=30, V=37, B=3, N=20, scale=0.5)
    with torch.no_grad():
        a = impl(logits, ids, mask, keys)
        b = impl(logits, ids, mask, keys)
        c = impl(logits, ids, mask, keys + 1)
    assert torch.equal(a.corrupted, b.corrupted) and torch.equal(a.replaced, b.replaced)
    assert not torch.equal(a.corrupted, c.corrupted)
    assert torch.equal(a.corrupted[~mask], ids[~mask])
    assert torch.equal(a.replaced, ((a.corrupted != ids) & mask).float())
    assert a.replaced[~mask].sum() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_draws_depend_on_the_sample_not_the_batch(impl):
    logits, ids, mask, keys = _batch(M=20, V=37, B=4, N=10, scale=0.5)
    with torch.no_grad():
        full = impl(logits, ids, mask, keys)
        rows = int(mask[:2].sum())
        half = impl(logits[rows:], ids[2:], mask[2:], keys[2:])
    assert torch.equal(full.corrupted[2:], half.corrupted)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_rows_touch_nothing_and_give_nan(impl):
    """A batch with fewer masked patches than rows: nonzero_static pads positions
    with -1. Those rows read and write no id and get a NaN loss (caught by the
    training loop's non-finite guard) instead of writing index -1."""
    logits, ids, mask, keys = _batch(M=10, V=37, B=2, N=12, scale=0.5)
    pos = torch.nonzero_static(mask.flatten(), size=13).squeeze(1)  # 3 padding rows
    assert int((pos < 0).sum()) == 3
    pad = torch.cat([logits, torch.randn(3, 37, device=logits.device)])
    with torch.no_grad():
        out = impl(pad, ids, mask, keys, positions=pos)
        full = impl(logits, ids, mask, keys, positions=pos[:10])
    assert torch.equal(out.corrupted, full.corrupted)  # the last id (index -1) is untouched
    assert torch.equal(out.corrupted.flatten()[-1:], full.corrupted.flatten()[-1:])
    assert bool(out.loss_rows[10:].isnan().all()) and bool(out.loss_rows[:10].isfinite().all())
    assert not bool(out.correct[10:].any())


def test_row_keys_order_and_errors():
    _, ids, mask, keys = _batch(M=12, V=7, B=3, N=8)
    assert row_keys(keys, mask).shape == (int(mask.sum()),)
    logits = torch.randn(int(mask.sum()) + 1, 7, device=ids.device)
    with pytest.raises(ValueError, match="logit rows"):
        sample_replace_reference(logits, ids, mask, keys)
    with pytest.raises(ValueError, match="temperature"):
        sample_replace_reference(logits[:-1], ids, mask, keys, temperature=0)


@needs_kernels
def test_static_positions_give_the_same_result():
    # cim.py gathers masked rows with torch.nonzero_static (fixed count per image): passing
    # those positions must change nothing but the absence of a host sync.
    logits, ids, mask, keys = _batch(M=12, V=37, B=3, N=8, scale=0.5)
    pos = torch.nonzero_static(mask.flatten(), size=12).squeeze(1)
    assert torch.equal(row_keys_at(keys, pos, mask.shape[1]), row_keys(keys, mask))
    with torch.no_grad():
        a = sample_ce_triton(logits, ids, mask, keys, positions=pos)
        b = sample_ce_triton(logits, ids, mask, keys)
        r = sample_ce_reference(logits, ids, mask, keys, positions=pos)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch.testing.assert_close(a.loss_rows, r.loss_rows, **LOSS_TOL)
    assert torch.equal(a.corrupted, r.corrupted) and torch.equal(a.correct, r.correct)


@needs_kernels
def test_no_masked_positions_and_errors():
    _, ids, _, keys = _batch(M=4, V=37)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    out = sample_ce_triton(torch.zeros(0, 37, device=DEVICE), ids, mask, keys)
    assert out.loss_rows.shape == (0,) and torch.equal(out.corrupted, ids) and out.replaced.sum() == 0
    logits, ids, mask, keys = _batch(M=4, V=37)
    with pytest.raises(ValueError, match="logit rows"):
        sample_ce_triton(logits[:3], ids, mask, keys)
    with pytest.raises(ValueError, match="temperature"):
        sample_ce_triton(logits, ids, mask, keys, temperature=0)
    with pytest.raises(ValueError, match="power of two"):
        sample_ce_triton(logits, ids, mask, keys, block_v=100)
    with pytest.raises(ValueError, match="logit rows"):
        sample_ce_triton(logits, ids, mask, keys, positions=mask.flatten().nonzero().squeeze(1)[:3])


@needs_kernels
def test_gradient_pass_only_when_needed():
    logits, ids, mask, keys = _batch(M=5, V=37)
    pos = mask.flatten().nonzero().squeeze(1)
    rk = row_keys(keys, mask)
    *_, grad = torch.ops.cimfast.sample_ce(logits, ids, pos, rk, 1.0, False)
    assert grad.numel() == 0  # no [M, V] buffer and no second pass in eval / no_grad
    out = sample_ce_triton(logits.requires_grad_(), ids, mask, keys)
    assert out.loss_rows.requires_grad and not out.replaced.requires_grad


@needs_kernels
def test_opcheck():
    logits, ids, mask, keys = _batch(M=5, V=37, dtype=torch.float32)
    pos = mask.flatten().nonzero().squeeze(1)
    rk = row_keys(keys, mask)
    torch.library.opcheck(torch.ops.cimfast.sample_ce,
                          (logits.requires_grad_(), ids, pos, rk, 0.7, True, 16, 2))
    torch.library.opcheck(torch.ops.cimfast.sample_ce, (logits.detach(), ids, pos, rk, 1.0, False))
    grad, scale = torch.randn(5, 37, device=DEVICE), torch.randn(5, device=DEVICE)
    torch.library.opcheck(torch.ops.cimfast.sample_ce_backward, (grad, scale))


@needs_kernels
def test_public_entries_dispatch(monkeypatch):
    logits, ids, mask, keys = _batch(M=5, V=37)
    ref = sample_ce_reference(logits, ids, mask, keys)
    for mode in ("triton", "reference"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        out = sample_ce(logits, ids, mask, keys)
        torch.testing.assert_close(out.loss_rows, ref.loss_rows, **LOSS_TOL)
        assert torch.equal(out.corrupted, ref.corrupted) and torch.equal(out.correct, ref.correct)
        corrupted, replaced = sample_replace(logits, ids, mask, keys)
        assert torch.equal(corrupted, ref.corrupted) and torch.equal(replaced, ref.replaced)


@needs_kernels
def test_compiles_fullgraph(monkeypatch):
    # aot_eager: Dynamo + AOTAutograd with fake tensors (what fullgraph needs
    # from the op registration) without Inductor's slow C++ build on the CPU.
    import torch._dynamo

    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    logits, ids, mask, keys = _batch(M=5, V=37)

    def step(logits, ids, mask, keys, static):
        pos = torch.nonzero_static(mask.flatten(), size=logits.shape[0]).squeeze(1) if static else None
        out = sample_ce(logits, ids, mask, keys, positions=pos)
        return out.loss_rows.mean(), out.corrupted

    y = logits.clone().requires_grad_()
    ref = sample_ce_reference(y, ids, mask, keys)
    ref.loss_rows.mean().backward()
    # static positions compile as they are; mask.nonzero() needs dynamic output shapes
    for static in (True, False):
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=not static):
            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
            x = logits.clone().requires_grad_()
            loss, corrupted = compiled(x, ids, mask, keys, static)
            loss.backward()
        torch.testing.assert_close(loss, ref.loss_rows.mean(), **LOSS_TOL)
        assert torch.equal(corrupted, ref.corrupted)
        torch.testing.assert_close(x.grad, y.grad, **GRAD_TOL[torch.float32])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_with_inductor_on_gpu(dtype):
    # Inductor on the CPU would build C++ for minutes around an interpreted kernel: GPU only.
    import torch._dynamo

    logits, ids, mask, keys = _batch(M=300, V=8192, B=4, N=100, dtype=dtype)
    pos = mask.flatten().nonzero().squeeze(1)
    rk = row_keys(keys, mask)

    def step(logits):
        loss, corrupted, *_ = torch.ops.cimfast.sample_ce(logits, ids, pos, rk, 1.0, True)
        return loss.mean(), corrupted

    torch._dynamo.reset()
    x = logits.clone().requires_grad_()
    loss, corrupted = torch.compile(step, fullgraph=True)(x)
    loss.backward()
    y = logits.float().requires_grad_()
    ref = sample_ce_reference(y, ids, mask, keys)
    ref.loss_rows.mean().backward()
    torch.testing.assert_close(loss, ref.loss_rows.mean(), **LOSS_TOL)
    assert (corrupted != ref.corrupted).float().mean() <= 0.005
    torch.testing.assert_close(x.grad.float(), y.grad, **GRAD_TOL[dtype])


# ------------------------------------------------------------------ dispatch point

def test_dispatch_default_and_forced(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.use_triton(cpu) is False  # default: the reference off CUDA
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.use_triton(cpu) is False
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.use_triton(cpu)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(cpu)
    monkeypatch.setattr(dispatch, "INTERPRETER", True)
    assert dispatch.use_triton(cpu) is True
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="does not import"):
        dispatch.use_triton(cpu)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.use_triton(cpu) is False


def test_dispatch_logs_each_choice_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with caplog.at_level(logging.INFO, logger="cimfast"):
        for _ in range(3):
            dispatch.use_triton(torch.zeros(1))
    lines = [r.getMessage() for r in caplog.records if r.name == "cimfast"]
    assert lines == ["cimfast kernels: reference (CIMFAST_KERNELS=reference)"]


def test_dispatch_leaves_meta_tensors_unlogged(monkeypatch, caplog):
    """FLOP counting runs the model on the meta device: that choice is not the run's, and a GPU
    run's log opened with "cimfast kernels: reference (tensors are not on CUDA)" before it."""
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="cimfast"):
        assert dispatch.use_triton(torch.empty(2, device="meta")) is False
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # forced: still the reference on meta, no error
        monkeypatch.setattr(dispatch, "INTERPRETER", False)
        assert dispatch.use_triton(torch.empty(2, device="meta")) is False
        monkeypatch.delenv(dispatch.ENV_VAR)
        assert not [r for r in caplog.records if r.name == "cimfast"]
        dispatch.use_triton(torch.zeros(1))
    assert [r.getMessage() for r in caplog.records if r.name == "cimfast"] == [
        "cimfast kernels: reference (tensors are not on CUDA)"]
