"""The one dispatch point between the Triton kernels and their PyTorch references.

Rule: on CUDA tensors with Triton importable, the kernel;
otherwise the reference. ``CIMFAST_KERNELS=reference|triton`` forces a choice
for debugging. Forcing ``triton`` on CPU tensors only works under Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported),
which is how the tests run the kernels without a GPU. Each distinct choice is
logged once on the ``cimfast`` logger.
"""
from __future__ import annotations

import logging
import os

import torch

ENV_VAR = "CIMFAST_KERNELS"
CHOICES = ("reference", "triton")

log = logging.getLogger("cimfast")

try:  # an optional dependency: without it every op runs its reference
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install on an exotic platform
    triton = tl = None
    HAS_TRITON = False


def _interpreter_on() -> bool:
    # Triton decides interpreted vs compiled when ``@triton.jit`` decorates a
    # kernel, i.e. when the kernel modules are imported, right after this one.
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


#: True when the kernels of this package run in Triton's CPU interpreter.
INTERPRETER = HAS_TRITON and _interpreter_on()

_logged: set[tuple[bool, str]] = set()


def requested() -> str:
    """The forced choice from ``CIMFAST_KERNELS`` ("reference"/"triton"), or "auto"."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(CHOICES)} (or unset)")
    return value


def use_triton(*tensors) -> bool:
    """Whether the ops on these tensors run their Triton kernel (True) or reference (False)."""
    mode = requested()
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        # FLOP counting runs the model on the meta device: the reference (shapes only), whatever is
        # forced, and nothing logged (the log names the training device's choice only)
        return False
    # len(), not bool(list): torch 2.11's dynamo cannot trace bool() of a list (a graph break that
    # fails fullgraph compiles; later torch versions trace both)
    on_cuda = len(tensors) > 0 and all(t.is_cuda for t in tensors)
    if mode == "reference":
        choice, why = False, f"{ENV_VAR}=reference"
    elif mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=triton, but triton does not import; install triton or unset {ENV_VAR}")
        if not on_cuda and not INTERPRETER:
            raise RuntimeError(
                f"{ENV_VAR}=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before triton (or cimfast.kernels) is first imported, or use CUDA tensors")
        choice, why = True, f"{ENV_VAR}=triton" + ("" if on_cuda else " (Triton interpreter on the CPU)")
    elif not HAS_TRITON:
        choice, why = False, "triton does not import"
    elif not on_cuda:
        choice, why = False, "tensors are not on CUDA"
    else:
        choice, why = True, "CUDA tensors and triton available"
    # Logging is a side effect torch.compile cannot trace: log in eager only.
    if (choice, why) not in _logged and not torch.compiler.is_compiling():
        _logged.add((choice, why))
        log.info("cimfast kernels: %s (%s)", "triton" if choice else "reference", why)
    return choice
