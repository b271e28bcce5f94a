"""Imported first by the entry points when they run as scripts
(``deepspeed cimfast/train.py``): Python then puts ``cimfast/`` itself first
on ``sys.path``, where module names like ``config`` or ``metrics`` could
shadow other packages. Take that folder off the path and make sure the
``cimfast`` package is importable instead.

cimfast must be installed (``pip install -e .`` in a checkout, as
scripts/install.sh does): ``cimfast.kernels`` and ``cimfast.pipelines`` live
in the top-level ``kernels/`` and ``pipelines/`` folders and only the
install maps them into the package. The fallback below (the checkout's
parent folder on the path) finds ``cimfast`` itself but not those two."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import cimfast  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(_here))
