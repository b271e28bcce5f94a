"""The window-normalized pixel loss (ResPix): the reference's definition
checked against a per-pixel loop, the properties tested once over both
implementations (reference and fused kernel), and the kernel against the
reference.

Without a GPU the kernels run in Triton's interpreter, switched on here before
triton is first imported (see tests/test_sampling.py for the caveat).
Shapes stay tiny: the interpreter runs one program after another.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cimfast.kernels import dispatch  # noqa: E402
from cimfast.kernels.pixel_loss import (
    EPS,
    window_norm_loss,
    window_norm_loss_reference,
    window_norm_loss_triton,
    window_norm_losses,
    window_norm_losses_reference,
    window_norm_losses_triton,
    window_normalize,
)
from cimfast.models.vit import patchify  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not dispatch.HAS_TRITON or (DEVICE == "cpu" and not dispatch.INTERPRETER),
    reason="needs CUDA, or TRITON_INTERPRET=1 set before triton was first imported in this process")

# Tolerances. Loss: fp32 on both sides, the window statistics computed the
# same way (sums of differences to the centre pixel, offsets in the same
# order), so the targets agree to a few fp32 ulps of their O(1) values. Gradient 2 (pred - target) / numel: fp32 to rounding; bf16 pred
# gets a bf16 gradient, one cast: a whole ulp (2**-7) in the interpreter, which
# truncates, half of it on the GPU.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2**-7}

CASES = [  # (image shape, window, patch, block): odd sizes, several and ragged programs
    ((1, 3, 13, 17), 3, 0, 128),
    ((1, 3, 13, 17), 4, 0, 0),
    ((1, 3, 13, 17), 9, 0, 256),
    ((2, 3, 32, 32), 3, 0, 0),
    ((2, 3, 32, 32), 4, 0, 2048),
    ((2, 3, 32, 32), 9, 0, 0),
    ((2, 3, 16, 24), 3, 8, 256),  # MAE patch layout, non-square grid (2 x 3 patches)
    ((2, 3, 16, 24), 4, 8, 0),
    ((2, 3, 16, 24), 9, 8, 0),
]


def _inputs(shape, patch, dtype, image_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(shape, generator=g).to(image_dtype)
    pred = torch.randn(shape, generator=g)
    if patch:
        pred = patchify(pred, patch)
    return pred.to(dtype).to(DEVICE), image.to(DEVICE)


def _loss_and_grad(fn, pred, image, window, patch, weight=1.7, **kw):
    x = pred.detach().clone().requires_grad_()
    loss = fn(x, image, window, patch=patch, **kw)
    (loss * weight).backward()  # a non-unit upstream gradient reaches the backward kernel
    return loss, x.grad


@needs_kernels
@pytest.mark.parametrize("shape,window,patch,block", CASES[::2])
def test_trivial_loss_comes_from_the_same_pass(shape, window, patch, block):
    """The second output is the loss of predicting zero (the window mean) everywhere:
    the mean squared target, from the kernel's one pass, the reference's one target.
    It carries no gradient; the loss's gradient is the one of the loss alone."""
    pred, image = _inputs(shape, patch, torch.float32)
    x = pred.clone().requires_grad_()
    loss, trivial = window_norm_losses_triton(x, image, window, patch=patch, block=block)
    ref_loss, ref_trivial = window_norm_losses_reference(pred, image, window, patch=patch)
    target, _, _ = window_normalize(image, window)
    torch.testing.assert_close(trivial, (target ** 2).mean(), **LOSS_TOL)
    torch.testing.assert_close(trivial, ref_trivial, **LOSS_TOL)
    torch.testing.assert_close(trivial, window_norm_loss_reference(torch.zeros_like(pred), image, window,
                                                                   patch=patch), **LOSS_TOL)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert not trivial.requires_grad and not ref_trivial.requires_grad
    (loss + trivial).backward()
    _, grad = _loss_and_grad(window_norm_loss_triton, pred, image, window, patch, weight=1.0, block=block)
    torch.testing.assert_close(x.grad, grad)
    both = window_norm_losses(pred, image, window, patch=patch)  # the dispatch point gives both too
    assert len(both) == 2 and all(t.shape == () for t in both)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,window,patch,block", CASES)
def test_forward_backward_match_reference(shape, window, patch, block, dtype):
    pred, image = _inputs(shape, patch, dtype)
    loss, grad = _loss_and_grad(window_norm_loss_triton, pred, image, window, patch, block=block)
    # the reference's gradient for the same (upcast) prediction: the exact fp32 gradient
    ref_loss, ref_grad = _loss_and_grad(window_norm_loss_reference, pred.float(), image, window, patch)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert grad.dtype == dtype and grad.shape == pred.shape
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=GRAD_RTOL[dtype], atol=1e-5 * scale)


@needs_kernels
def test_bf16_image_and_noncontiguous_prediction():
    pred, image = _inputs((2, 3, 16, 24), 0, torch.float32, image_dtype=torch.bfloat16)
    pred_t = pred.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not pred_t.is_contiguous()
    loss, grad = _loss_and_grad(window_norm_loss_triton, pred_t, image, 5, 0)
    ref_loss, ref_grad = _loss_and_grad(window_norm_loss_reference, pred, image, 5, 0)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9)


IMPLS = [pytest.param(window_norm_loss_reference, id="reference"),
         pytest.param(window_norm_loss_triton, id="triton", marks=needs_kernels)]


def _loop_target(x, k, eps=EPS):
    """The definition, pixel by pixel: mean and variance over the window clipped at the border."""
    B, C, H, W = x.shape
    lo = k // 2
    out = torch.empty_like(x)
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    win = x[b, c, max(0, i - lo):min(H, i - lo + k), max(0, j - lo):min(W, j - lo + k)]
                    m = win.mean()
                    v = ((win - m) ** 2).mean()
                    out[b, c, i, j] = (x[b, c, i, j] - m) / torch.sqrt(v + eps)
    return out


@pytest.mark.parametrize("k,shape", [(3, (2, 3, 7, 5)), (4, (1, 3, 6, 9)), (9, (1, 2, 11, 10))])
def test_target_equals_per_pixel_loop(k, shape):
    x = torch.rand(shape, dtype=torch.float64)
    target, _, _ = window_normalize(x, k)
    assert torch.allclose(target.double(), _loop_target(x, k), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,shape", [(3, (2, 3, 7, 5)), (9, (1, 2, 11, 10))])
def test_loss_equals_the_definition(impl, k, shape):
    x = torch.rand(shape, dtype=torch.float64)
    pred = torch.randn(shape)
    loss = impl(pred.to(DEVICE), x.float().to(DEVICE), k)
    assert torch.allclose(loss.cpu(), ((pred.double() - _loop_target(x, k)) ** 2).mean().float(), atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_flat_image_gives_zero_target(impl):
    # A constant image has target 0 everywhere: the loss is mean(pred^2). Sums
    # of differences to the centre pixel leave no spurious variance of
    # rounding errors behind (E[x^2] - E[x]^2 would).
    image = torch.full((1, 3, 9, 11), 0.37, device=DEVICE)
    pred = torch.randn(1, 3, 9, 11, device=DEVICE)
    torch.testing.assert_close(impl(pred, image, 4, 1e-6), (pred ** 2).mean(), rtol=1e-6, atol=0)


@needs_kernels
@pytest.mark.parametrize("eps", [1e-6, EPS])
def test_kernel_and_reference_agree_in_nearly_flat_windows(eps):
    """8-bit noise on a flat grey: the variance is tiny, where E[x^2] - E[x]^2 and
    centred sums used to disagree. Both now compute it the same way."""
    g = torch.Generator().manual_seed(0)
    image = (0.5 + torch.randint(-1, 2, (2, 3, 16, 24), generator=g) / 255).to(DEVICE)
    pred = torch.randn(2, 3, 16, 24, generator=g).to(DEVICE)
    loss, grad = _loss_and_grad(lambda p, i, w, patch: window_norm_loss_triton(p, i, w, eps), pred, image, 9, 0)
    ref_loss, ref_grad = _loss_and_grad(lambda p, i, w, patch: window_norm_loss_reference(p, i, w, eps),
                                        pred, image, 9, 0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_gradcheck_wrt_prediction():
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64)
    pred = torch.randn(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: window_norm_loss_reference(p, x, 3), (pred,))
    loss = window_norm_loss_reference(pred, x, 3)
    loss.backward()
    expected = 2 * (pred.detach() - window_normalize(x, 3)[0]) / pred.numel()
    assert torch.allclose(pred.grad, expected, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_shape_mismatch_is_an_error(impl):
    with pytest.raises(ValueError, match="differ in shape"):
        impl(torch.zeros(1, 3, 4, 4, device=DEVICE), torch.zeros(1, 3, 4, 5, device=DEVICE), 3)


@needs_kernels
def test_shape_errors():
    image = torch.zeros(2, 3, 16, 24, device=DEVICE)
    with pytest.raises(ValueError, match="differ in shape"):
        window_norm_loss_triton(torch.zeros(2, 3, 16, 23, device=DEVICE), image, 3)
    with pytest.raises(ValueError, match="patch layout"):
        window_norm_loss_triton(torch.zeros(2, 6, 192, device=DEVICE), image, 3, patch=4)
    with pytest.raises(ValueError, match="whole number"):
        window_norm_loss_triton(torch.zeros(2, 6, 192, device=DEVICE), image, 3, patch=5)
    with pytest.raises(ValueError, match="patch layout"):
        window_norm_loss_reference(torch.zeros(2, 6, 192), image.cpu(), 3, patch=4)


@needs_kernels
@pytest.mark.parametrize("patch", [0, 4])
def test_opcheck(patch):
    pred, image = _inputs((1, 2, 8, 12), patch, torch.float32)
    torch.library.opcheck(torch.ops.cimfast.window_norm_loss,
                          (pred.requires_grad_(), image, 3, 1e-6, patch, 0))
    grad_out = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.cimfast.window_norm_loss_backward,
                          (grad_out, pred.detach(), image, 4, 1e-6, patch, 64))


@needs_kernels
def test_public_entry_dispatch(monkeypatch):
    pred, image = _inputs((2, 3, 16, 24), 8, torch.float32)
    ref = window_norm_loss_reference(pred, image, 3, patch=8)
    for mode in ("triton", "reference"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        torch.testing.assert_close(window_norm_loss(pred, image, 3, patch=8), ref, **LOSS_TOL)
    # fp64 always takes the reference (the kernels compute in fp32): gradcheck holds
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64, device=DEVICE)
    p = torch.randn(1, 3, 6, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: window_norm_loss(q, x, 3), (p,))


@needs_kernels
def test_compiles_fullgraph(monkeypatch):
    # aot_eager: Dynamo + AOTAutograd with fake tensors through the dispatching
    # public function, without Inductor's slow C++ build on the CPU.
    import torch._dynamo

    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    pred, image = _inputs((2, 3, 16, 24), 8, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, i: window_norm_loss(p, i, 5, patch=8), fullgraph=True, backend="aot_eager")
    loss, grad = _loss_and_grad(lambda p, i, w, patch: compiled(p, i), pred, image, 5, 8)
    ref_loss, ref_grad = _loss_and_grad(window_norm_loss_reference, pred, image, 5, 8)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_with_inductor_on_gpu(dtype):
    import torch._dynamo

    pred, image = _inputs((4, 3, 224, 224), 16, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, i: window_norm_loss_triton(p, i, 9, patch=16), fullgraph=True)
    loss, grad = _loss_and_grad(lambda p, i, w, patch: compiled(p, i), pred, image, 9, 16)
    ref_loss, ref_grad = _loss_and_grad(window_norm_loss_reference, pred.float(), image, 9, 16)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=GRAD_RTOL[dtype], atol=1e-5 * ref_grad.abs().max().item())
