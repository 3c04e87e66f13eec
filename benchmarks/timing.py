"""Timers giving p20/p50/p80 of one call in milliseconds, and the device's copy bandwidth."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

QUANTILES = (0.2, 0.5, 0.8)
# Far beyond any last-level cache, and long enough per call that a parallel region's start-up cost is noise.
MIN_COPY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Effort:
    """How long to measure. CPU runs take at least cpu_min_samples calls so that slow eager calls still
    give a spread; the full CPU run is meant to finish in a few minutes on two cores."""
    cpu_min_run_s: float
    cpu_min_samples: int
    gpu_warmup_ms: int
    gpu_rep_ms: int


FULL = Effort(cpu_min_run_s=1.0, cpu_min_samples=10, gpu_warmup_ms=25, gpu_rep_ms=100)
QUICK = Effort(cpu_min_run_s=0.2, cpu_min_samples=3, gpu_warmup_ms=10, gpu_rep_ms=25)


def time_ms(fn: Callable[[], object], device: torch.device, effort: Effort) -> tuple[float, float, float]:
    if device.type == "cuda":
        return _time_cuda_ms(fn, effort)
    return _time_cpu_ms(fn, effort)


def _time_cpu_ms(fn: Callable[[], object], effort: Effort) -> tuple[float, float, float]:
    start = time.perf_counter()
    fn()  # warm-up, and its duration sizes the measurement
    single_call_s = time.perf_counter() - start
    min_run_time = max(effort.cpu_min_run_s, effort.cpu_min_samples * single_call_s)
    # Timer runs single-threaded unless told otherwise; the ops are meant to use every intra-op thread.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    seconds = torch.tensor(measurement.times, dtype=torch.float64)
    p20, p50, p80 = seconds.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return 1e3 * p20, 1e3 * p50, 1e3 * p80


def _time_cuda_ms(fn: Callable[[], object], effort: Effort) -> tuple[float, float, float]:
    # Imported here: triton is only required for GPU runs.
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(fn, warmup=effort.gpu_warmup_ms, rep=effort.gpu_rep_ms, quantiles=list(QUANTILES))
    return p20, p50, p80


def copy_gbps(moved_bytes: int, device: torch.device, effort: Effort) -> float:
    """Achieved GB/s of dst.copy_(src) moving moved_bytes, or MIN_COPY_BYTES if more (read plus write).

    This is the roofline's memory floor: sized at least like the largest case so that the copy, like the
    op, streams from main memory.
    """
    src = torch.ones(max(moved_bytes, MIN_COPY_BYTES) // 2 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    _, p50_ms, _ = time_ms(lambda: dst.copy_(src), device, effort)
    return 2 * src.nbytes / (p50_ms * 1e-3) / 1e9
