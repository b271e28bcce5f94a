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


def _shm_allreduce_files() -> set:
    try:
        return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True, scope="session")
def _no_shared_memory_left():
    """Every run the suite launches unlinks DeepSpeed's /dev/shm all-reduce file
    (69 MB a rank); one left behind is a leak of memory that outlives the run."""
    before = _shm_allreduce_files()
    yield
    left = sorted(_shm_allreduce_files() - before)
    for f in left:
        os.unlink(os.path.join("/dev/shm", f))
    assert not left, f"runs left DeepSpeed all-reduce files in /dev/shm: {left}"
