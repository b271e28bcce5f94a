"""Every patch cimfast makes to a third-party library, each naming the version
it was written against. A patch replaces one function with a twin that does
the same arithmetic without a cost the original carries; each twin is tested
against the original (tests/test_guards.py, tests/test_finetune.py). When a
library moves on, check the original still reads as quoted, or drop the patch.

- DeepSpeed 0.19.8, ZeRO-1/2 (``deepspeed.runtime.zero.stage_1_and_2``):
  ``unscale_and_clip_grads`` and ``mask_nan_or_inf_with_val_inplace`` without
  their host syncs; ``get_grad_norm_direct`` as one foreach kernel.
  Installed on an engine's optimizer by ``remove_clip_sync``.
- timm 1.0.31 with Pillow 13 (``timm.data.auto_augment.NAME_TO_OP``):
  RandAugment's posterize to 0 bits gives a black image (Pillow 13 refuses
  0 bits). Installed by ``patch_timm_posterize``.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist


def _unscale_and_clip_grads_on_device(self, grad_groups_flat, total_norm):
    """DeepSpeed ZeRO-1/2's ``unscale_and_clip_grads`` with the same arithmetic,
    minus its host read: DeepSpeed asks ``bool(norm is invalid)`` to swap a
    non-finite norm for inf; ``torch.where`` does that on the device.

    A non-finite gradient norm with a finite loss (an overflow in the backward)
    is also OR-ed into the guard's ``found_inf``, so the fused optimizer skips
    that step as DeepSpeed's own overflow check would (that check is off when
    the guard skips on the device). The norm is the global one: every rank
    decides alike."""
    found_inf = getattr(self.optimizer, "found_inf", None)
    if found_inf is not None and total_norm is not None:
        norm = torch.as_tensor(total_norm, dtype=torch.float, device=found_inf.device)
        torch.maximum(found_inf, (~(torch.isfinite(norm) & (norm >= 0))).float(), out=found_inf)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.:
        norm = torch.as_tensor(total_norm, dtype=torch.float, device=self.device)
        clip_norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        combined_scale = torch.clamp(clip, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1. / combined_scale)


def mask_nan_or_inf_on_device(input, device=None, val=-1.):
    """DeepSpeed's ``mask_nan_or_inf_with_val_inplace`` (ZeRO-1/2 marks a
    non-finite gradient norm as -1, whatever ``val`` says) without its two host
    syncs: it builds the fill value with ``torch.tensor(-1.0, device=...)`` (a
    copy from pageable host memory) and hands ``masked_fill_`` that tensor (read
    back with ``.item()``), twice a step (once per parameter group). A Python
    float fills without either."""
    input.masked_fill_(~torch.isfinite(input), -1.0)


def _grad_norm_direct_foreach(self, gradients, params, norm_type=2):
    """DeepSpeed ZeRO-1/2's ``get_grad_norm_direct`` (written against 0.19.8) with one
    ``torch._foreach_norm`` over the partition's gradients, accumulating in the
    same norm dtype, instead of a norm kernel per tensor (about 200 launches a
    step for ViT-B), each on an fp64 copy of its gradient. The same number up
    to the order of the sums. Its special cases (the max norm, model- or
    pipeline-parallel parameters) keep DeepSpeed's own code."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.utils import get_norm_dtype

    grads = [g.data for g in gradients if not getattr(g, "_zero_padding", False)]
    plain = (float(norm_type) == 2.0 and self.model_parallel_rank == 0 and len(grads) == len(params)
             and not any(getattr(p, "ds_pipe_replicated", False) for p in params))
    if not plain:
        return self._cimfast_grad_norm_direct(gradients, params, norm_type)
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
        total_norm = torch.stack(norms).pow(2.0).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1.0 / 2.0)
    stage_1_and_2.mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def remove_clip_sync(optimizer) -> bool:
    """Give a DeepSpeed ZeRO-1/2 optimizer the sync-free gradient clipping above,
    the one-kernel gradient norm, and its gradient-norm masking the sync-free
    twin above (a module-level function there: every ZeRO-1/2 optimizer of the
    process gets it)."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not hasattr(optimizer, "unscale_and_clip_grads"):
        return False
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads_on_device, optimizer)
    if hasattr(optimizer, "get_grad_norm_direct") and not hasattr(optimizer, "_cimfast_grad_norm_direct"):
        optimizer._cimfast_grad_norm_direct = optimizer.get_grad_norm_direct
        optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct_foreach, optimizer)
    if hasattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace"):
        stage_1_and_2.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_on_device
    return True


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits kept giving the black image that Pillow < 13 gave:
    Pillow 13 refuses 0 bits, which RandAugment's increasing posterize draws (range 4 -> 0)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """RandAugment's three posterize ops (timm 1.0.31) through ``_posterize``."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize
