"""Fused ops of cimfast, each beside its plain PyTorch reference.

Import as ``cimfast.kernels``. This package knows nothing of the trainer.
"""
from cimfast.kernels.sampling import sample_replace, sample_replace_reference
from cimfast.kernels.pixel_loss import window_norm_loss, window_norm_loss_reference, window_normalize

__all__ = ["sample_replace", "sample_replace_reference", "window_norm_loss",
           "window_norm_loss_reference", "window_normalize"]
