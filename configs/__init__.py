"""The DeepSpeed configs cimfast ships (package data, read with importlib.resources)."""
