import glob
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
    """This user's DeepSpeed all-reduce files in /dev/shm that no live process maps."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    try:
        names = {f for f in os.listdir("/dev/shm") if f.startswith(prefix)}
    except FileNotFoundError:
        return set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        if not names:
            break
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:  # the process ended, or is not ours
            continue
        names = {n for n in names if f"/dev/shm/{n}" not in text}
    return names


@pytest.fixture(autouse=True, scope="session")
def _no_shared_memory_left():
    """Every run the suite launches unlinks DeepSpeed's /dev/shm all-reduce file
    (69 MB a rank); one left behind, mapped by no process, is memory lost until reboot."""
    before = _shm_allreduce_files()
    yield
    left = sorted(_shm_allreduce_files() - before)
    for name in left:  # mapped by no process: nothing uses them; the memory comes back
        os.unlink(os.path.join("/dev/shm", name))
    assert not left, f"runs left DeepSpeed all-reduce files in /dev/shm (remove them with rm): {left}"
