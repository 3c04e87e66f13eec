"""Benchmark cases and providers for summed pyramid pooling, ICNet's pyramid pooling module."""

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.case import Case, Provider, ProviderBuilder, case_grid, device_dtypes, standard_providers
from icnet.model import PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_MAP, RELEASED_PPM_STRIDES
from icnet_kernels import pyramid_pool_sum, pyramid_pool_sum_reference
from icnet_kernels.reference import pyramid_bin_matrices

NAME = "pyramid_pool_sum"
BINS = PPM_BINS
CHANNELS = 1024
# ICNet at 1025x2049 reaches its pyramid pooling module at 1/32 scale: a 33x65 map, which the released
# model pools with explicit windows (they only fit that size).
ICNET_MAP, ICNET_KERNEL_SIZES, ICNET_STRIDES = RELEASED_PPM_MAP, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES
# Twice ICNet's map side, in float16: the shape the kernels' bandwidth target is set on.
BANDWIDTH_MAP = (65, 129)


def eager_pyramid_pool_sum(x: torch.Tensor, bins: Sequence[int], kernel_sizes, strides,
                           align_corners: bool) -> torch.Tensor:
    """The composition ICNet's PyTorch ports run: pool each level, resize it back, add it to the input."""
    size = x.shape[-2:]
    out = x
    for level, bin_size in enumerate(bins):
        if kernel_sizes is None:
            pooled = F.adaptive_avg_pool2d(x, bin_size)
        else:
            pooled = F.avg_pool2d(x, kernel_sizes[level], strides[level])
        out = out + F.interpolate(pooled, size=size, mode="bilinear", align_corners=align_corners)
    return out


def _useful_flops(shape: Sequence[int], bins, kernel_sizes, strides, align_corners) -> int:
    """Per level: one add per element of each pooling window, one divide per pooled value, and per output
    pixel a 4-tap bilinear blend (4 multiplies, 3 adds) plus the add into the sum."""
    height, width = shape[-2:]
    per_plane = 0
    for (pool_h, pool_w, _, _), bin_size in zip(
            pyramid_bin_matrices(height, width, bins, kernel_sizes, strides, align_corners), bins):
        window_elements = int(pool_h.count_nonzero()) * int(pool_w.count_nonzero())
        per_plane += window_elements + bin_size * bin_size + 8 * height * width
    return math.prod(shape[:-2]) * per_plane


def _case(variant: str, shape: tuple[int, ...], dtype: torch.dtype, kernel_sizes, strides) -> Case:
    params = {"bins": BINS, "kernel_sizes": kernel_sizes, "strides": strides, "align_corners": True}
    # No dense arithmetic: the pooling sums and bilinear blends leave the op bound by its memory traffic.
    return Case(op=NAME, variant=variant, shape=shape, dtype=dtype, params=params,
                min_bytes=2 * math.prod(shape) * dtype.itemsize, flops=_useful_flops(shape, **params),
                dense_flops=0)


def cases(device: torch.device, quick: bool) -> list[Case]:
    grid = case_grid(quick, dtypes=device_dtypes(device))
    geometries = {"adaptive": (None, None), "icnet-explicit": (ICNET_KERNEL_SIZES, ICNET_STRIDES)}
    found = [_case(variant, (batch, CHANNELS, *ICNET_MAP), dtype, kernel_sizes, strides)
             for dtype, batch in grid for variant, (kernel_sizes, strides) in geometries.items()]
    if device.type == "cuda":
        largest = max(batch for _, batch in grid)
        found.append(_case("adaptive", (largest, CHANNELS, *BANDWIDTH_MAP), torch.float16, None, None))
    return found


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(case.shape, generator=generator, device=device).to(case.dtype),)


def reference(case: Case, inputs: tuple[torch.Tensor]) -> torch.Tensor:
    (x,) = inputs
    return pyramid_pool_sum_reference(x.double(), **case.params)


def _eager(case: Case) -> Provider:
    return partial(eager_pyramid_pool_sum, **case.params)


def _icnet(backend: str) -> ProviderBuilder:
    return lambda case: partial(pyramid_pool_sum, **case.params, backend=backend)


def providers(device: torch.device) -> dict[str, ProviderBuilder]:
    return standard_providers(device, _eager, _icnet)
