"""Shared test helpers: which backends run here, memory layouts, and the error budget."""

import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import icnet_kernels

GPU = torch.cuda.is_available()
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def backend_cases():
    """(backend, device) pairs to test: every one that can run here, interpreted Triton included."""
    cases = [pytest.param("native", "cpu", id="native-cpu",
                          marks=pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")),
             pytest.param("triton", "cpu", id="triton-interpreted",
                          marks=pytest.mark.skipif(not TRITON_INTERPRETED, reason="a GPU is present: Triton runs natively"))]
    cases.append(pytest.param("native", "cuda", id="native-cuda", marks=pytest.mark.skipif(
        not (GPU and icnet_kernels.native_cuda_available()), reason="needs a GPU and _C built with CUDA")))
    cases.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.skipif(not GPU, reason="needs a GPU")))
    return cases


def dtypes_for(backend: str, device: str):
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    if backend == "triton":  # the interpreter: its dot products of bfloat16 are wrong (numpy has no bfloat16)
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


LAYOUTS = ("contiguous", "channels_last", "strided")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x, laid out as requested ('strided': a non-contiguous view)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    big = torch.full((n, c + 1, h * 2, w + 3), float("nan"), dtype=x.dtype, device=x.device)
    view = big[:, 1:, ::2, 2:w + 2]
    view.copy_(x)
    return view


def within_budget(actual, exact, torch_same_precision, atol) -> tuple[bool, float, float]:
    """flash-attention's rule: error <= 2 x the error of the same-precision PyTorch run + atol. Returns
    whether it holds, the error and the PyTorch run's error (maximum absolute errors against exact)."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    err_torch = (torch_same_precision.double() - exact).abs().max().item()
    return err <= 2 * err_torch + atol, err, err_torch


def assert_within_budget(actual, exact, torch_same_precision, atol, what=""):
    ok, err, err_torch = within_budget(actual, exact, torch_same_precision, atol)
    assert ok, f"{what}: error {err:.3e} > 2 x torch's {err_torch:.3e} + {atol:.1e}"


ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


PATH_TALLY: Counter = Counter()


def record_path(case: str, path: str) -> None:
    """Counts a random example drawn for one kernel path; conftest prints the tally after the run, so the
    share of examples each path got is in the test output."""
    PATH_TALLY[case, path] += 1


def op_cases(name: str, triton_name: str | None = None) -> list:
    """(op name, device) for every implementation of an op that can run here: the C++ kernel on the CPU,
    the Triton op (interpreted without a GPU), the CUDA kernel on a GPU."""
    gpu_or_cpu = "cuda" if GPU else "cpu"
    cases = []
    if icnet_kernels.native_available():
        cases.append(pytest.param(name, "cpu", id=f"{name}-cpu"))
    triton_name = triton_name or f"{name}_triton"
    cases.append(pytest.param(triton_name, gpu_or_cpu, id=f"{triton_name}-{gpu_or_cpu}"))
    if GPU and icnet_kernels.native_cuda_available():
        cases.append(pytest.param(name, "cuda", id=f"{name}-cuda"))
    return cases


class DispatchedOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher's kernels: ops as "namespace.name", names without the
    namespace."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> list[str]:
        return [op.split(".")[-1] for op in self.ops]
