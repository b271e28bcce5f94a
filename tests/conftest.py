import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch

# Triton kernels run in its interpreter on a CPU-only machine; the switch has
# to be set before triton is first imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
