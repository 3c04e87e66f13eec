"""The roofline floor: the least time a computation's memory traffic and arithmetic allow on a device, and
the device peaks it is set against (measured in the run, or from a datasheet for known GPUs).

The op benchmarks (run.py) and the end-to-end benchmark (icnet_e2e.py) both take their floors from here.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from benchmarks import timing
from benchmarks.case import dtype_name


@dataclass(frozen=True)
class Peaks:
    """A device's ceilings: memory bandwidth in GB/s and the dense (GEMM, convolution) rate in TFLOP/s per
    dtype name. source says where they come from; dense_rates keeps each measured problem's rate."""
    gbps: float
    tflops: dict[str, float]
    source: str
    dense_rates: dict[str, dict[str, float]] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"source": self.source, "gbps": self.gbps, "tflops": self.tflops}


@dataclass(frozen=True)
class _Datasheet:
    fp16_tflops: float  # dense tensor-core rate, also bfloat16's
    tf32_tflops: float
    fp32_tflops: float  # CUDA cores
    gbps: float


# NVIDIA's datasheet figures without structured sparsity. Matched as substrings of the device name, first
# match wins: the PCIe and NVL variants before the plain name, which torch reports for the SXM parts
# ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
_DATASHEETS = (
    ("H100 PCIe", _Datasheet(756, 378, 51, 2000)),
    ("H100 NVL", _Datasheet(835, 418, 60, 3900)),
    ("H100", _Datasheet(989, 495, 67, 3350)),
    ("H200 NVL", _Datasheet(835, 418, 60, 4800)),
    ("H200", _Datasheet(989, 495, 67, 4800)),
)


def datasheet_peaks(device_name: str, float32_is_tf32: bool) -> Peaks | None:
    """The datasheet peaks of a known GPU, or None. float32 gets the TF32 rate when float32 convolutions and
    GEMMs run as TF32 (cuDNN's default for convolutions), else the CUDA-core rate."""
    for fragment, sheet in _DATASHEETS:
        if fragment in device_name:
            float32 = sheet.tf32_tflops if float32_is_tf32 else sheet.fp32_tflops
            tflops = {"float32": float32, "float16": sheet.fp16_tflops, "bfloat16": sheet.fp16_tflops}
            return Peaks(sheet.gbps, tflops, f"datasheet ({fragment})")
    return None


def measured_peaks(dtypes: Iterable[torch.dtype], device: torch.device, effort: timing.Effort,
                   moved_bytes: int = timing.MIN_COPY_BYTES) -> Peaks:
    """Copy bandwidth and, per dtype, the faster of a large torch.mm and a large 3x3 convolution, measured
    now on device (see timing.copy_gbps and timing.dense_tflops)."""
    gbps = timing.copy_gbps(moved_bytes, device, effort)
    rates = {dtype_name(dtype): timing.dense_tflops(dtype, device, effort) for dtype in dict.fromkeys(dtypes)}
    return Peaks(gbps, {name: max(problems.values()) for name, problems in rates.items()}, "measured", rates)


def floor_ms(moved_bytes: float, flops: float, gbps: float, tflops: float) -> tuple[float, str]:
    """(floor in ms, "memory" or "compute"): the larger of moving moved_bytes at gbps and computing flops at
    tflops, and which of the two it is."""
    memory_ms = moved_bytes / gbps / 1e6
    compute_ms = flops / tflops / 1e9
    return max(memory_ms, compute_ms), "memory" if memory_ms >= compute_ms else "compute"
