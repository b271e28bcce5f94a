"""Fused ops of cimfast, each beside its plain PyTorch reference.

Import as ``cimfast.kernels``. This package knows nothing of the trainer.
``cimfast.kernels.dispatch`` picks kernel or reference (``CIMFAST_KERNELS``).
"""
from cimfast.kernels.dispatch import use_triton
from cimfast.kernels.sampling import (SampleCE, row_keys_at, sample_ce, sample_ce_reference, sample_replace,
                                      sample_replace_reference)
from cimfast.kernels.pixel_loss import (window_norm_loss, window_norm_loss_reference, window_norm_losses,
                                        window_norm_losses_reference, window_normalize)

__all__ = ["SampleCE", "row_keys_at", "sample_ce", "sample_ce_reference", "sample_replace", "sample_replace_reference",
           "use_triton", "window_norm_loss", "window_norm_loss_reference", "window_norm_losses",
           "window_norm_losses_reference", "window_normalize"]
