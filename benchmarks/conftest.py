"""Shared bits of the kernel benchmarks: a `gpu` marker and a summary table of
time, achieved bandwidth, peak memory and the kernel/reference speed ratio."""
import pytest

_ROWS = pytest.StashKey[list]()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.stash[_ROWS] = []


@pytest.fixture
def kernel_report(request):
    """A list; each benchmark appends one dict (op, impl, ms, GB/s, peak MiB, speedup)."""
    return request.config.stash[_ROWS]


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("cimfast kernels vs references")
    tr.write_line(f"{'op':<18}{'impl':<22}{'device':<8}{'mean ms':>10}{'GB/s':>9}{'peak MiB':>10}{'speedup':>9}")
    for r in rows:
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        tr.write_line(f"{r['op']:<18}{r['impl']:<22}{r['device']:<8}{fmt(r['ms'], '.3f'):>10}"
                      f"{fmt(r['gbps'], '.1f'):>9}{fmt(r['peak_mib'], '.0f'):>10}{fmt(r['speedup'], '.2f'):>9}")
    for note in sorted({r["note"] for r in rows if r.get("note")}):
        tr.write_line(note)
