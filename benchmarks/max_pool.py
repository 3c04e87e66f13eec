"""Benchmark cases and providers for max pooling without indices, ICNet's pool1 (3x3, stride 2, padding 1
after conv1). GPU only: ATen's CPU max pooling writes no indices already."""

import math
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.case import Case, Provider, ProviderBuilder, gpu_case_grid, standard_providers
from icnet_kernels import max_pool, max_pool_reference

NAME = "max_pool"
CHANNELS = 64
ICNET_MAP = (257, 513)  # conv1's output at 1025x2049 (the trunk runs on the half-resolution image)
GEOMETRY = {"kernel_size": 3, "stride": 2, "padding": 1}


def _case(variant: str, batch: int, dtype: torch.dtype) -> Case:
    shape = (batch, CHANNELS, *ICNET_MAP)
    out_pixels = batch * CHANNELS * ((ICNET_MAP[0] - 1) // 2 + 1) * ((ICNET_MAP[1] - 1) // 2 + 1)
    return Case(op=NAME, variant=variant, shape=shape, dtype=dtype,
                params={**GEOMETRY, "channels_last": variant == "channels_last"},
                min_bytes=(math.prod(shape) + out_pixels) * dtype.itemsize, flops=8 * out_pixels, dense_flops=0)


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return []
    return [_case(variant, batch, dtype) for dtype, batch in gpu_case_grid(quick)
            for variant in ("channels_last", "nchw")]


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.shape, generator=generator, device=device).to(case.dtype)
    return (x.contiguous(memory_format=torch.channels_last) if case.params["channels_last"] else x,)


def reference(case: Case, inputs) -> torch.Tensor:
    (x,) = inputs
    return max_pool_reference(x.double(), **GEOMETRY)


def _eager(case: Case) -> Provider:
    return partial(F.max_pool2d, **GEOMETRY)


def _icnet(backend: str) -> ProviderBuilder:
    return lambda case: partial(max_pool, **GEOMETRY, backend=backend)


def providers(device: torch.device) -> dict[str, ProviderBuilder]:
    found = standard_providers(device, _eager, _icnet)
    found.pop("icnet-native")  # no compiled kernel: the CPU's ATen pooling writes no indices
    return found
