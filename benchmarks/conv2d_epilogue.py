"""Benchmark cases and providers for the convolution with its epilogue on ICNet's 1/32 branch, whose 33x65
maps (1025x2049 input) give a GPU few output tiles: the convolutions a Triton implicit GEMM with split-K
would take from cuDNN. GPU only: on the CPU the library's convolutions have no Triton rival."""

import math
from functools import partial

import torch

from benchmarks.case import Case, Provider, ProviderBuilder, gpu_case_grid, standard_providers
from icnet_kernels import conv2d_epilogue, conv2d_epilogue_reference

NAME = "conv2d_epilogue"
MAP = (33, 65)
# variant: (in channels, out channels, kernel, dilation, residual); conv4 and conv5 of the half-width model
LAYERS = {"conv4-3x3-d2": (128, 128, 3, 2, False), "conv5-3x3-d4": (256, 256, 3, 4, False),
          "conv5-increase-residual": (256, 1024, 1, 1, True)}


def _case(variant: str, batch: int, dtype: torch.dtype) -> Case:
    ci, co, k, dilation, residual = LAYERS[variant]
    pixels = batch * math.prod(MAP)
    flops = 2 * pixels * co * ci * k * k
    moved = pixels * (ci + co * (2 if residual else 1)) + co * ci * k * k + co
    return Case(op=NAME, variant=variant, shape=(batch, ci, *MAP), dtype=dtype,
                params={"padding": dilation * (k // 2), "dilation": dilation, "relu": True},
                min_bytes=moved * dtype.itemsize, flops=flops, dense_flops=flops,
                details={"out_channels": co, "kernel": k, "residual": residual})


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return []
    return [_case(variant, batch, dtype) for dtype, batch in gpu_case_grid(quick) for variant in LAYERS]


def make_inputs(case: Case, device: torch.device) -> tuple:
    generator = torch.Generator(device=device).manual_seed(0)
    n, ci, h, w = case.shape
    co, k = case.details["out_channels"], case.details["kernel"]

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator, device=device) * scale).to(case.dtype)

    x = randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
    residual = randn(n, co, h, w).contiguous(memory_format=torch.channels_last) if case.details["residual"] else None
    return x, randn(co, ci, k, k, scale=(ci * k * k) ** -0.5), randn(co), residual


def reference(case: Case, inputs) -> torch.Tensor:
    x, weight, bias, residual = (None if t is None else t.double() for t in inputs)
    return conv2d_epilogue_reference(x, weight, bias, residual, **case.params)


def _eager(case: Case) -> Provider:
    return partial(conv2d_epilogue_reference, **case.params)


def _icnet(backend: str, split_k: int = 1) -> ProviderBuilder:
    return lambda case: partial(conv2d_epilogue, **case.params, split_k=split_k, backend=backend)


def providers(device: torch.device) -> dict[str, ProviderBuilder]:
    found = standard_providers(device, _eager, _icnet)
    found.pop("icnet-native")  # cuDNN is the eager provider
    if device.type == "cuda":
        found["icnet-triton-split4"] = _icnet("triton", 4)
    return found
