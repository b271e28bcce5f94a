import pytest
import torch

from cimfast.kernels.pixel_loss import EPS, window_norm_loss_reference, window_normalize


def _loop_target(x, k):
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
                    out[b, c, i, j] = (x[b, c, i, j] - m) / torch.sqrt(v + EPS)
    return out


@pytest.mark.parametrize("k,shape", [(3, (2, 3, 7, 5)), (4, (1, 3, 6, 9)), (9, (1, 2, 11, 10))])
def test_target_equals_per_pixel_loop(k, shape):
    x = torch.rand(shape, dtype=torch.float64)
    target, _, _ = window_normalize(x, k)
    assert torch.allclose(target.double(), _loop_target(x, k), atol=1e-3)
    pred = torch.randn(shape)
    loss = window_norm_loss_reference(pred, x, k)
    assert torch.allclose(loss, ((pred.double() - _loop_target(x, k)) ** 2).mean().float(), atol=1e-3)


def test_gradcheck_wrt_prediction():
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64)
    pred = torch.randn(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: window_norm_loss_reference(p, x, 3), (pred,))
    loss = window_norm_loss_reference(pred, x, 3)
    loss.backward()
    expected = 2 * (pred.detach() - window_normalize(x, 3)[0]) / pred.numel()
    assert torch.allclose(pred.grad, expected, atol=1e-9)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        window_norm_loss_reference(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), 3)
