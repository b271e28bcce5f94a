"""Imported first by the entry points when they run as scripts
(``deepspeed cimfast/train.py``): Python then puts ``cimfast/`` itself first
on ``sys.path``, where module names like ``config`` or ``metrics`` could
shadow other packages. Take that folder off the path and make sure the
``cimfast`` package (installed, or this checkout) is importable instead."""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
try:
    import cimfast  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(_here))
