"""ResPix loss: MSE against the original image normalized by a sliding window.

Reference semantics: for each channel and pixel, mean and variance are taken
over the ``window x window`` neighbourhood centred on the pixel (for an even
window the extra row/column lies above/left), clipped at the image border
(only real pixels count). The target is ``(x - mean) / sqrt(var + eps)``; the
loss is the mean over all elements of ``(pred - target) ** 2``. The gradient
flows to ``pred`` only.

``pred`` may come in image layout [B, C, H, W] (``patch=0``) or straight from
a ViT head in patch layout [B, N, patch*patch*C] (MAE's ``patchify`` order:
patch n = (y//p)*(W//p) + x//p, index within it ((y%p)*p + x%p)*C + c), which
the fused kernel reads in place: no unpatchify copy.

``window_norm_losses`` returns the loss and, from the same pass, its trivial
baseline: the loss of predicting zero everywhere (the window mean), which is
the mean squared target.

The fused kernel never materializes the target: each program loops over the
window of its pixels for the mean and variance, forms the target and sums its
squared errors into a per-program partial sum; the backward kernel recomputes
the target. ``window_norm_loss`` dispatches (``cimfast.kernels.dispatch``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cimfast.kernels.dispatch import HAS_TRITON, INTERPRETER, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# The variance floor, for pixels in [0, 1]. Smaller values turn 8-bit noise
# into targets: a flat window holding only quantization noise (variance
# (1/255)^2 / 12 = 1.3e-6) gets unit-size targets with eps = 1e-6, about a
# third of that size with 1e-5, and small ones with 1e-4 (a std floor of
# 2.55/255). benchmarks/respix_eps.py measures this on the demo photos; the
# numbers are in benchmarks/RESULTS.md.
EPS = 1e-4


def window_stats(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean - x, variance) over each pixel's window, clipped at the border.

    Box sums of x and x^2 by running sums in float64: O(1) per pixel whatever
    the window (the kernel's loop over the window's offsets costs window^2),
    and E[x^2] - E[x]^2 keeps about 1e-12 absolute precision for pixels in
    [0, 1], far below the smallest variance floor, so kernel (shifted sums in
    float32) and reference agree to the kernel's rounding even in flat windows."""
    lo = window // 2
    hi = window - 1 - lo
    B, C, H, W = x.shape
    xd = x.double()

    def box(t: torch.Tensor) -> torch.Tensor:  # window sums, zero outside the image
        t = F.pad(t, (lo + 1, hi, lo + 1, hi)).cumsum(2).cumsum(3)
        return (t[:, :, window:, window:] - t[:, :, :-window, window:]
                - t[:, :, window:, :-window] + t[:, :, :-window, :-window])

    count = box(torch.ones_like(xd[:1, :1]))
    mean = box(xd) / count
    var = (box(xd * xd) / count - mean * mean).clamp_min(0)
    return (mean - xd).to(x.dtype), var.to(x.dtype)


def window_normalize(x: torch.Tensor, window: int, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, mean, std) of an image batch [B, C, H, W], in fp32 (fp64 stays fp64)."""
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean_d, var = window_stats(x, window)
    std = torch.sqrt(var + eps)
    return -mean_d / std, x + mean_d, std


def _unpatchify(pred: torch.Tensor, patch: int, image_shape) -> torch.Tensor:
    """[B, N, patch*patch*C] in MAE's order -> [B, C, H, W] for an image of ``image_shape``
    (any H, W that are multiples of ``patch``; ``vit.unpatchify`` assumes a square grid)."""
    B, C, H, W = image_shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a whole number of {patch}x{patch} patches")
    h, w = H // patch, W // patch
    if tuple(pred.shape) != (B, h * w, patch * patch * C):
        raise ValueError(f"prediction {tuple(pred.shape)} is not the patch layout "
                         f"{(B, h * w, patch * patch * C)} of image {tuple(image_shape)}")
    x = pred.reshape(B, h, w, patch, patch, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def window_norm_losses_reference(pred: torch.Tensor, image: torch.Tensor, window: int,
                                 eps: float = EPS, patch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pred: [B, C, H, W], or [B, N, patch*patch*C] with ``patch``; image: [B, C, H, W].
    Returns (loss, trivial loss), scalars (fp32; fp64 for fp64 inputs); the
    trivial one (predicting zero) carries no gradient."""
    if patch:
        pred = _unpatchify(pred, patch, image.shape)
    if pred.shape != image.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and image {tuple(image.shape)} differ in shape")
    with torch.no_grad():
        target, _, _ = window_normalize(image, window, eps)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    target = target.to(dtype)
    return ((pred.to(dtype) - target) ** 2).mean(), (target * target).mean()


def window_norm_loss_reference(pred: torch.Tensor, image: torch.Tensor, window: int,
                               eps: float = EPS, patch: int = 0) -> torch.Tensor:
    """The loss alone (see ``window_norm_losses_reference``)."""
    return window_norm_losses_reference(pred, image, window, eps, patch)[0]


# --------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _window_target(img_ptr, offs, ok, H, W, eps, WINDOW: tl.constexpr):
        """Target of the pixels at flat offsets ``offs`` of a contiguous [B, C, H, W] image."""
        x = offs % W
        y = (offs // W) % H
        lo = WINDOW // 2
        centre = tl.load(img_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # Sums of (neighbour - centre), as the reference's window_stats: no
        # E[x^2] - E[x]^2 cancellation in flat regions.
        s = tl.zeros_like(centre)
        ss = tl.zeros_like(centre)
        for dy in range(WINDOW):
            yy = y + (dy - lo)
            row_ok = ok & (yy >= 0) & (yy < H)
            for dx in range(WINDOW):
                xx = x + (dx - lo)
                nb_ok = row_ok & (xx >= 0) & (xx < W)
                v = tl.load(img_ptr + offs + ((dy - lo) * W + (dx - lo)), mask=nb_ok, other=0.0)
                d = tl.where(nb_ok, v.to(tl.float32) - centre, 0.0)
                s += d
                ss += d * d
        # Only real pixels count: the window clipped at the border, counted exactly.
        rows = tl.minimum(y - lo + WINDOW, H) - tl.maximum(y - lo, 0)
        cols = tl.minimum(x - lo + WINDOW, W) - tl.maximum(x - lo, 0)
        count = (rows * cols).to(tl.float32)
        mean_d = s / count  # mean - centre
        var = tl.maximum(ss / count - mean_d * mean_d, 0.0)
        return -mean_d / tl.sqrt_rn(var + eps)  # (centre - mean) / std

    @triton.jit
    def _pred_offsets(offs, C, H, W, PATCH: tl.constexpr):
        """Where pixel ``offs`` of [B, C, H, W] lives in pred: the same place, or MAE's patch layout."""
        if PATCH == 0:
            p_offs = offs
        else:
            x = offs % W
            y = (offs // W) % H
            plane = offs // (H * W)
            c = plane % C
            b = plane // C
            patch_index = (y // PATCH) * (W // PATCH) + x // PATCH
            within = ((y % PATCH) * PATCH + x % PATCH) * C + c
            p_offs = b * (C * H * W) + patch_index * (PATCH * PATCH * C) + within
        return p_offs

    @triton.jit
    def _window_norm_loss_fwd_kernel(pred_ptr, img_ptr, partial_ptr, numel, C, H, W, eps,
                                     WINDOW: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        target = _window_target(img_ptr, offs, ok, H, W, eps, WINDOW)
        p = tl.load(pred_ptr + _pred_offsets(offs, C, H, W, PATCH), mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, p - target, 0.0)
        t = tl.where(ok, target, 0.0)
        # Partial sums per program (the loss's and the trivial loss's), summed after
        # the launch: deterministic, no atomics.
        tl.store(partial_ptr + 2 * pid, tl.sum(d * d, axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(t * t, axis=0))

    @triton.jit
    def _window_norm_loss_bwd_kernel(grad_out_ptr, pred_ptr, img_ptr, grad_ptr, numel, C, H, W, eps, two_over_numel,
                                     WINDOW: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        target = _window_target(img_ptr, offs, ok, H, W, eps, WINDOW)  # recomputed, never stored
        p_offs = _pred_offsets(offs, C, H, W, PATCH)
        p = tl.load(pred_ptr + p_offs, mask=ok, other=0.0).to(tl.float32)
        scale = tl.load(grad_out_ptr).to(tl.float32) * two_over_numel  # d mean((p - t)^2) / dp, times grad_out
        tl.store(grad_ptr + p_offs, ((p - target) * scale).to(grad_ptr.dtype.element_ty), mask=ok)


def _launch_config(block: int, interpreter: bool = INTERPRETER) -> tuple[int, int]:
    """(pixels per program, warps). 0 means: pick."""
    if block and block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    # The interpreter runs programs one after another: few wide programs.
    block = block or (4096 if interpreter else 1024)
    return block, 8 if block >= 2048 else 4


def _check_shapes(pred, image, window, patch):
    if image.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got {tuple(image.shape)}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if patch < 0:
        raise ValueError(f"patch must be 0 (image layout) or the patch size, got {patch}")
    if patch:
        B, C, H, W = image.shape
        if H % patch or W % patch:
            raise ValueError(f"image {H}x{W} is not a whole number of {patch}x{patch} patches")
        expected = (B, (H // patch) * (W // patch), patch * patch * C)
        if tuple(pred.shape) != expected:
            raise ValueError(f"prediction {tuple(pred.shape)} is not the patch layout {expected} "
                             f"of image {tuple(image.shape)}")
    elif pred.shape != image.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and image {tuple(image.shape)} differ in shape")
    if image.numel() >= 2**31:
        raise ValueError("the fused loss indexes with int32: split batches of 2**31 elements or more")


# ----------------------------------------------------------------- host wrapper + ops

@torch.library.custom_op("cimfast::window_norm_loss", mutates_args=())
def _window_norm_loss_op(pred: torch.Tensor, image: torch.Tensor, window: int, eps: float, patch: int,
                         block: int = 0) -> torch.Tensor:
    """[loss, trivial loss] in fp32; pred in image layout (patch=0) or MAE's patch layout."""
    pred, image = pred.contiguous(), image.contiguous()
    _, C, H, W = image.shape
    numel = image.numel()
    block, num_warps = _launch_config(block)
    programs = triton.cdiv(numel, block)
    partial = torch.empty(programs, 2, dtype=torch.float32, device=pred.device)
    _window_norm_loss_fwd_kernel[(programs,)](
        pred, image, partial, numel, C, H, W, float(eps),
        WINDOW=window, PATCH=patch, BLOCK=block, num_warps=num_warps)
    return partial.sum(0) / numel


@_window_norm_loss_op.register_fake
def _(pred, image, window, eps, patch, block=0):
    return pred.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op("cimfast::window_norm_loss_backward", mutates_args=())
def _window_norm_loss_backward_op(grad_out: torch.Tensor, pred: torch.Tensor, image: torch.Tensor, window: int,
                                  eps: float, patch: int, block: int = 0) -> torch.Tensor:
    """d loss / d pred times grad_out[0] (the trivial loss has no gradient), in pred's layout and dtype."""
    pred, image = pred.contiguous(), image.contiguous()
    _, C, H, W = image.shape
    numel = image.numel()
    grad = torch.empty_like(pred)
    block, num_warps = _launch_config(block)
    _window_norm_loss_bwd_kernel[(triton.cdiv(numel, block),)](
        grad_out.contiguous(), pred, image, grad, numel, C, H, W, float(eps), 2.0 / numel,
        WINDOW=window, PATCH=patch, BLOCK=block, num_warps=num_warps)
    return grad


@_window_norm_loss_backward_op.register_fake
def _(grad_out, pred, image, window, eps, patch, block=0):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _window_norm_loss_setup_context(ctx, inputs, output):
    pred, image, window, eps, patch, block = inputs
    ctx.save_for_backward(pred, image)
    ctx.args = (window, eps, patch, block)


def _window_norm_loss_backward(ctx, grad_out):
    pred, image = ctx.saved_tensors
    grad = torch.ops.cimfast.window_norm_loss_backward(grad_out, pred, image, *ctx.args)
    return grad, None, None, None, None, None  # the target is a constant: no gradient to the image


_window_norm_loss_op.register_autograd(_window_norm_loss_backward, setup_context=_window_norm_loss_setup_context)


def window_norm_losses_triton(pred: torch.Tensor, image: torch.Tensor, window: int, eps: float = EPS,
                              patch: int = 0, *, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels (CUDA, or the CPU under TRITON_INTERPRET=1); fp32/bf16/fp16
    inputs, fp32 math, fp32 (loss, trivial loss). ``block`` overrides pixels per program (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("window_norm_loss_triton needs triton")
    _check_shapes(pred, image, window, patch)
    both = torch.ops.cimfast.window_norm_loss(pred, image, int(window), float(eps), int(patch), int(block))
    return both[0], both[1].detach()


def window_norm_loss_triton(pred: torch.Tensor, image: torch.Tensor, window: int, eps: float = EPS,
                            patch: int = 0, *, block: int = 0) -> torch.Tensor:
    """The loss alone (see ``window_norm_losses_triton``)."""
    return window_norm_losses_triton(pred, image, window, eps, patch, block=block)[0]


def window_norm_losses(pred, image, window: int, eps: float = EPS, patch: int = 0):
    """Dispatch point for the ResPix loss (see ``cimfast.kernels.dispatch``): the
    kernel or ``window_norm_losses_reference``; (loss, trivial loss) from one pass
    over the window statistics. fp64 inputs (gradcheck) always take the
    reference: the kernels compute in fp32."""
    if pred.dtype != torch.float64 and image.dtype != torch.float64 and use_triton(pred, image):
        return window_norm_losses_triton(pred, image, window, eps, patch)
    return window_norm_losses_reference(pred, image, window, eps, patch)


def window_norm_loss(pred, image, window: int, eps: float = EPS, patch: int = 0):
    """The ResPix loss alone (see ``window_norm_losses``)."""
    return window_norm_losses(pred, image, window, eps, patch)[0]
