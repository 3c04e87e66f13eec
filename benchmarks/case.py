"""What run.py needs from each op's benchmark module: its cases, inputs, float64 reference and providers."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration of an op.

    params: the op's own keyword arguments. min_bytes: inputs read once plus output written once, the
    traffic no implementation can avoid. flops: the arithmetic of the op's direct definition, not what a
    provider executes; TFLOP/s divide it. dense_flops: the matrix-multiply arithmetic (convolutions, GEMMs)
    that the cheapest exact algorithm known for this case needs, which the roofline's compute term divides
    by the measured dense rate; less than flops where the case admits a cheaper exact evaluation, 0 for an
    op without such arithmetic (elementwise adds and blends are not what that rate measures).
    details: op-specific fields copied into every row (the shapes of inputs after the first, say).
    """
    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: dict[str, Any]
    min_bytes: int
    flops: int
    dense_flops: int
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"op": self.op, "variant": self.variant, "shape": list(self.shape),
                "dtype": dtype_name(self.dtype), "flops": self.flops,
                "dense_flops": self.dense_flops, "min_bytes": self.min_bytes} | self.details


BATCHES = (1, 16)  # one frame (latency) and a batch of frames (throughput)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes an op is timed in unless its module says otherwise: float32 on CPUs; float32, float16 and
    bfloat16 on GPUs."""
    return (torch.float32,) if device.type == "cpu" else GPU_DTYPES


def case_grid(quick: bool, batches: tuple[int, ...] = BATCHES, dtypes: tuple[torch.dtype, ...] = GPU_DTYPES,
              quick_dtypes: tuple[torch.dtype, ...] | None = None) -> list[tuple[torch.dtype, int]]:
    """The (dtype, batch) pairs an op's case list spans, dtype-major. quick keeps the first batch and
    quick_dtypes (None: every dtype)."""
    if quick:
        batches, dtypes = batches[:1], dtypes if quick_dtypes is None else quick_dtypes
    return [(dtype, batch) for dtype in dtypes for batch in batches]


def gpu_case_grid(quick: bool) -> list[tuple[torch.dtype, int]]:
    """The grid of a GPU-only op: batches 1 and 16 in float32, float16 and bfloat16; quick, batch 1 in
    float16."""
    return case_grid(quick, quick_dtypes=(torch.float16,))


def dtype_name(dtype: torch.dtype) -> str:
    """How rows and the results file name a dtype: "float32", "bfloat16"."""
    return str(dtype).removeprefix("torch.")


Provider = Callable[..., torch.Tensor]
ProviderBuilder = Callable[[Case], Provider]


class OpBenchmark(Protocol):
    """An op's benchmark module (see pyramid_pool_sum.py); run.OPS lists them by NAME."""
    NAME: str

    def cases(self, device: torch.device, quick: bool) -> list[Case]: ...

    def make_inputs(self, case: Case, device: torch.device) -> tuple[torch.Tensor, ...]: ...

    def reference(self, case: Case, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def providers(self, device: torch.device) -> dict[str, ProviderBuilder]: ...


def compiled(eager: ProviderBuilder, mode: str | None) -> ProviderBuilder:
    """torch.compile of the eager provider in the given mode (None: the default)."""
    def build(case: Case) -> Provider:
        # A fresh dynamo cache per case: each case compiles once for its static shape and dtype, and the
        # cases together stay clear of dynamo's recompile limit.
        torch._dynamo.reset()
        return torch.compile(eager(case), mode=mode, dynamic=False)
    return build


def standard_providers(device: torch.device, eager: ProviderBuilder,
                       icnet: Callable[[str], ProviderBuilder]) -> dict[str, ProviderBuilder]:
    """Every op's provider set. icnet maps an icnet_kernels backend name to its provider builder."""
    if device.type == "cpu":
        return {"eager": eager, "icnet-native": icnet("native")}
    return {
        "eager": eager,
        "compile": compiled(eager, None),
        "compile-max-autotune": compiled(eager, "max-autotune-no-cudagraphs"),
        "icnet-native": icnet("native"),
        "icnet-triton": icnet("triton"),
    }
