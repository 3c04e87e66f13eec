"""Test setup: Triton runs interpreted on machines without a GPU, untuned, and outputs start as NaN.

The tests are safe to run in parallel (pytest-xdist's -n): each writes only under its own tmp_path.

TRITON_INTERPRET and ICNET_TRITON_AUTOTUNE must be set before icnet_kernels (and so triton) is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness does not need the fastest tile, and tuning compiles and times every tile for each new shape
# (minutes per hypothesis test on a GPU). The benchmarks tune, and check the chosen tile against float64.
os.environ.setdefault("ICNET_TRITON_AUTOTUNE", "0")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True)
# a GPU run's time is short: the property tests sample less, the fixed edge-geometry tests stay exhaustive
settings.register_profile("gpu", max_examples=10, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def poison_uninitialized_outputs():
    """Every torch.empty* (the kernels' outputs included) starts as NaN, so an element a kernel never
    writes fails the comparison instead of passing by luck."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def nan_device_memory():
    """Fills the CUDA caching allocator's free memory with NaN: a large block and many small ones (the
    allocator serves requests up to 1 MiB from a pool of its own) are filled and freed but stay cached, so
    the test's allocations, internal buffers that no torch.empty poisons included, reuse NaN memory and an
    uninitialised read shows as NaN. torch.cuda.graph empties that cache before a capture, so inside a graph
    it is poison_uninitialized_outputs' NaN fill of every torch.empty* (captured, and replayed) that shows."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    large = torch.full((2**30,), float("nan"), dtype=torch.float32, device="cuda")  # 4 GiB
    small = [torch.full((2**17,), float("nan"), dtype=torch.float32, device="cuda") for _ in range(256)]
    torch.cuda.synchronize()
    del large, small
    yield


def pytest_terminal_summary(terminalreporter):
    """The share of random examples each kernel path got (tests.helpers.record_path), so a run shows that
    every path was exercised."""
    from tests.helpers import PATH_TALLY

    if not PATH_TALLY:
        return
    terminalreporter.section("random examples per kernel path")
    cases = sorted({case for case, _ in PATH_TALLY})
    for case in cases:
        counts = {path: n for (c, path), n in PATH_TALLY.items() if c == case}
        total = sum(counts.values())
        shares = ", ".join(f"{path} {n} ({100 * n / total:.0f}%)" for path, n in sorted(counts.items()))
        terminalreporter.write_line(f"{case}: {shares}")
