"""cimfast: a fast trainer for Corrupted Image Modeling (CIM) pre-training."""
__version__ = "0.1.0"
