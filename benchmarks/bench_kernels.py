"""Fused kernels against their references, on the shapes of CIM pre-training.

    pytest benchmarks/bench_kernels.py              # table at the end of the run
    pytest benchmarks/bench_kernels.py --benchmark-json out.json   # extra_info has it all

On a GPU: the sampler + cross-entropy on 256 x 75 masked rows of an 8192-token
vocabulary (bf16 logits) and the ResPix loss on 256 x 3 x 224 x 224 images,
window 9, prediction in the ViT-B/16 patch layout (bf16), forward + backward
each, kernel and reference in the same run. Reported: mean time, achieved
bandwidth (the bytes the fused kernels must move, divided by the time: the
same numerator for both, so the columns compare), peak memory above what the
inputs hold (torch.cuda.max_memory_allocated), and reference time / kernel time.

Without a GPU those skip. The CPU variant times the references alone on small
shapes: the kernels would run in Triton's interpreter there, whose speed says
nothing about the compiled kernel's.
"""
import pytest
import torch

from cimfast.kernels import dispatch
from cimfast.kernels.pixel_loss import window_norm_loss_reference, window_norm_loss_triton
from cimfast.kernels.sampling import sample_ce_reference, sample_ce_triton

GPU_READY = torch.cuda.is_available() and dispatch.HAS_TRITON and not dispatch.INTERPRETER
needs_gpu = pytest.mark.skipif(
    not GPU_READY,
    reason="GPU benchmark: needs a CUDA GPU with compiled Triton kernels (no GPU here, "
           "or TRITON_INTERPRET=1 is set)")
CPU_NOTE = ("CPU: references only; an interpreted Triton kernel's speed means nothing, "
            "so the kernels are timed on a GPU alone")

IMPLS = {
    "sample_ce": {"reference": sample_ce_reference, "triton": sample_ce_triton},
    "window_norm_loss": {"reference": window_norm_loss_reference, "triton": window_norm_loss_triton},
}
_means: dict[tuple[str, str, str], float] = {}


def _sampling_inputs(B, N, masked, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):  # exactly `masked` per sample, like blockwise masking's fixed count
        mask[b, torch.randperm(N, generator=g)[:masked]] = True
    ids = torch.randint(0, V, (B, N), generator=g)
    logits = torch.randn(B * masked, V, generator=g).to(dtype)
    keys = torch.randint(0, 2**32, (B,), generator=g)
    return [t.to(device) for t in (logits, ids, mask, keys)]


def _loss_inputs(B, size, patch, dtype, device):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(B, 3, size, size, generator=g)
    n = (size // patch) ** 2
    pred = torch.randn(B, n, patch * patch * 3, generator=g).to(dtype)
    return pred.to(device), image.to(device)


def _run(benchmark, kernel_report, op, impl, step, nbytes, device, rounds):
    """Benchmark ``step`` (forward + backward), measure its peak memory, report."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        step()
        sync()

    timed()  # warm-up: compile the kernel, fill the allocator's cache
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.group = f"{op} ({device})"
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else None  # None: --benchmark-disable
    speedup = None
    if mean is not None:
        _means[(op, impl, device)] = mean
        ref = _means.get((op, "reference", device))
        if impl != "reference" and ref is not None:
            speedup = ref / mean
    row = {"op": op, "impl": impl, "device": device, "ms": None if mean is None else mean * 1e3,
           "gbps": None if mean is None else nbytes / mean / 1e9, "peak_mib": peak, "speedup": speedup,
           "note": CPU_NOTE if device == "cpu" else None}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "note"})
    kernel_report.append(row)


def _sample_ce_case(benchmark, kernel_report, impl, device, B, masked, V, dtype, rounds, **launch):
    logits, ids, mask, keys = _sampling_inputs(B, 196, masked, V, dtype, device)
    # static masked positions, as cim.py gathers them: no host sync inside the step
    pos = torch.nonzero_static(mask.flatten(), size=B * masked).squeeze(1)
    x = logits.requires_grad_()
    fn = IMPLS["sample_ce"][impl]

    def step():
        x.grad = None
        fn(x, ids, mask, keys, 1.0, positions=pos, **launch).loss_rows.mean().backward()

    # The fused design's traffic: logits read twice (statistics, then the gradient
    # pass), the gradient buffer written and read back, d logits written.
    nbytes = 5 * x.numel() * x.element_size()
    variant = [f"{k[0]}{v}" for k, v in launch.items()]  # r: rows per program, b: columns per chunk
    label = f"{impl} {','.join(variant)}" if variant else impl
    _run(benchmark, kernel_report, "sample_ce", label, step, nbytes, device, rounds)


def _loss_case(benchmark, kernel_report, impl, device, B, size, patch, window, dtype, rounds):
    pred, image = _loss_inputs(B, size, patch, dtype, device)
    p = pred.requires_grad_()
    fn = IMPLS["window_norm_loss"][impl]

    def step():
        p.grad = None
        fn(p, image, window, patch=patch).backward()

    # Forward and backward each read pred and image once; the backward writes
    # d pred (the window's other pixels come from cache).
    nbytes = 3 * p.numel() * p.element_size() + 2 * image.numel() * image.element_size()
    _run(benchmark, kernel_report, "window_norm_loss", impl, step, nbytes, device, rounds)


# ---------------------------------------------------------------- GPU: realistic shapes

@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "triton"])  # reference first: the triton row gets the ratio
def test_sample_ce_gpu(benchmark, kernel_report, impl):
    _sample_ce_case(benchmark, kernel_report, impl, "cuda", B=256, masked=75, V=8192,
                    dtype=torch.bfloat16, rounds=20)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_window_norm_loss_gpu(benchmark, kernel_report, impl):
    _loss_case(benchmark, kernel_report, impl, "cuda", B=256, size=224, patch=16, window=9,
               dtype=torch.bfloat16, rounds=20)


# Other launch shapes of the sampler beside the default (rows per program r, columns per
# chunk b): data for choosing the defaults.
# Run after test_sample_ce_gpu, whose reference row gives each its speed-up.
SWEEP = [dict(rows_per_program=r, block_v=b) for r, b in ((1, 2048), (1, 4096), (2, 4096), (4, 2048), (8, 1024))]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("launch", SWEEP, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_sample_ce_launch_sweep_gpu(benchmark, kernel_report, launch):
    _sample_ce_case(benchmark, kernel_report, "triton", "cuda", B=256, masked=75, V=8192,
                    dtype=torch.bfloat16, rounds=10, **launch)


# ------------------------------------------------------- CPU: references, small shapes

@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU benchmarks run instead")
def test_sample_ce_reference_cpu(benchmark, kernel_report):
    _sample_ce_case(benchmark, kernel_report, "reference", "cpu", B=8, masked=75, V=8192,
                    dtype=torch.float32, rounds=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU benchmarks run instead")
def test_window_norm_loss_reference_cpu(benchmark, kernel_report):
    _loss_case(benchmark, kernel_report, "reference", "cpu", B=8, size=224, patch=16, window=9,
               dtype=torch.float32, rounds=3)
