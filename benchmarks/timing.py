"""Timers giving p20/p50/p80 of one call in milliseconds, and the device's copy bandwidth and dense FLOP rate."""

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

QUANTILES = (0.2, 0.5, 0.8)
# Far beyond any last-level cache, and long enough per call that a parallel region's start-up cost is noise.
MIN_COPY_BYTES = 256 * 2**20
# Dense problems on which torch's GEMM and convolution libraries run at their sustained rates: per device
# kind, the side of torch.mm's square matrices and the batch of a 3x3 convolution with 512 channels in and
# out on a 64x64 map. About 0.1 s a call on two CPU cores, about 1 ms on a datacenter GPU in half precision.
DENSE_PROBLEMS = {"cpu": (2048, 1), "cuda": (8192, 32)}
CONV_CHANNELS, CONV_MAP = 512, 64


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


def time_together_ms(fns: dict[str, Callable[[], object]], device: torch.device,
                     effort: Effort) -> dict[str, tuple[float, float, float]]:
    """p20/p50/p80 of each of several functions that are to be compared.

    On the CPU they take turns, one call each per round, so that a slow spell of a shared machine falls on
    all of them alike and their ratios stay meaningful; on a GPU each is timed by do_bench in turn.
    """
    if device.type == "cuda":
        return {name: _time_cuda_ms(fn, effort) for name, fn in fns.items()}
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while (len(next(iter(samples.values()))) < effort.cpu_min_samples
           or time.perf_counter() - start < effort.cpu_min_run_s * len(fns)):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
    quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
    return {name: tuple((1e3 * torch.tensor(times, dtype=torch.float64).quantile(quantiles)).tolist())
            for name, times in samples.items()}


def error_text(exc: BaseException) -> str:
    """The first line of an exception, as a result row's "error" gives it."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def time_or_fail(fns: dict[str, Callable[[], object]], device: torch.device,
                 effort: Effort) -> tuple[dict[str, tuple[float, float, float]], dict[str, str]]:
    """time_together_ms, and the error of each function that raised while timed (out of memory under a
    timer's repetitions, say; "while timed: " and error_text) in place of its times, so that one failure
    does not end the comparison. On a GPU each function is timed alone and fails alone; on the CPU, where
    they take turns, all fail together."""
    if device.type != "cuda":
        try:
            return time_together_ms(fns, device, effort), {}
        except Exception as exc:
            return {}, dict.fromkeys(fns, f"while timed: {error_text(exc)}")
    times, errors = {}, {}
    for name, fn in fns.items():
        try:
            times[name] = _time_cuda_ms(fn, effort)
        except Exception as exc:
            errors[name] = f"while timed: {error_text(exc)}"
    return times, errors


def copy_gbps(moved_bytes: int, device: torch.device, effort: Effort) -> float:
    """Achieved GB/s of dst.copy_(src) moving moved_bytes, or MIN_COPY_BYTES if more (read plus write).

    This is the roofline's memory floor: sized at least like the largest case so that the copy, like the
    op, streams from main memory.
    """
    src = torch.ones(max(moved_bytes, MIN_COPY_BYTES) // 2 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    _, p50_ms, _ = time_ms(lambda: dst.copy_(src), device, effort)
    return 2 * src.nbytes / (p50_ms * 1e-3) / 1e9


def dense_tflops(dtype: torch.dtype, device: torch.device, effort: Effort) -> dict[str, float]:
    """Achieved TFLOP/s of a large torch.mm and a large 3x3 convolution in dtype: the roofline's compute
    ceiling is the higher of the two.

    Measured rather than taken from a datasheet, so that it is the rate this device and torch's libraries
    actually sustain. Both, because neither is always the faster: on the AMD EPYC the CPU results come from,
    oneDNN's convolution outran MKL's GEMM, so a floor from torch.mm alone was undercut by convolutions.
    A float32 GEMM is measured under the TF32 setting cuDNN convolutions run with.
    """
    side, batch = DENSE_PROBLEMS[device.type]
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    a, b = randn(side, side), randn(side, side)
    x, w = randn(batch, CONV_CHANNELS, CONV_MAP, CONV_MAP), randn(CONV_CHANNELS, CONV_CHANNELS, 3, 3)
    with _matmul_precision_like_convolutions(device):
        _, mm_ms, _ = time_ms(lambda: torch.mm(a, b), device, effort)
    _, conv_ms, _ = time_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, effort)
    conv_flops = 2 * batch * CONV_MAP**2 * CONV_CHANNELS**2 * 9
    return {"mm": 2 * side**3 / (mm_ms * 1e-3) / 1e12, "conv3x3": conv_flops / (conv_ms * 1e-3) / 1e12}


def fp32_matmul_uses_tf32(device: torch.device) -> bool:
    """Whether dense_tflops(torch.float32, device, ...) measures a TF32 GEMM."""
    return device.type == "cuda" and torch.backends.cudnn.allow_tf32


@contextlib.contextmanager
def _matmul_precision_like_convolutions(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":  # the setting only affects CUDA
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if fp32_matmul_uses_tf32(device) else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
