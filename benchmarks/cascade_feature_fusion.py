"""Benchmark cases and providers for cascade feature fusion, ICNet's CFF unit.

FLOPs: flops is the direct op's count, 2*N*H*W*Co*(9*Cl + Ch) (the dilated 3x3 conv over the upsampled map
plus the 1x1 projection, both at high's resolution; resize, BN, add and ReLU not counted), and TFLOP/s
divide it in every variant so that they compare across variants and providers. In the shortcut variant
(ICNet's exact 2x zoom, align_corners=True, dilation 2) the 3x3 conv commutes with the resize and can run
at low's resolution, and in the general variant each tap's channel mix does (the CPU kernel's tap-first
evaluation), so dense_flops, which the roofline floor uses, counts 2*N*Co*(h*w*9*Cl + H*W*Ch) in both:
about 3x (sub24) and 3.4x (sub12) fewer. direct_flops and dense_flops say so for any shape; the end-to-end
benchmark counts ICNet's CFF units with them too.
"""

import math
from functools import partial

import torch

from benchmarks.case import BATCHES, Case, Provider, ProviderBuilder, case_grid, device_dtypes, standard_providers
from icnet_kernels import cascade_feature_fusion, cascade_feature_fusion_reference
from icnet_kernels.cff_geometry import exact_shortcut, tap_first

NAME = "cascade_feature_fusion"
OUT_CHANNELS = 128
DILATION = 2
# ICNet at 1025x2049: (low channels, low map, high channels, high map). sub24 fuses the 1/32 branch into
# the 1/16 one, sub12 that result into the 1/8 one; each high map is low's exact 2x zoom (2h-1, 2w-1).
STAGES = {
    "sub24": (256, (33, 65), 256, (65, 129)),
    "sub12": (128, (65, 129), 64, (129, 257)),
}
# align_corners=True on these maps is ICNet's own arithmetic and takes the shortcut; False, on the same
# shapes, takes the general implicit-GEMM path.
ALIGN_CORNERS = (True, False)


def eager_cascade_feature_fusion(low, high, weight_low, weight_high, scale_low, shift_low, scale_high,
                                 shift_high, dilation: int, align_corners: bool) -> torch.Tensor:
    """The unfused ATen composition (resize, dilated 3x3 conv, BN, 1x1 conv, BN, add, ReLU), which is the
    reference's definition, taking its arguments in the fused op's order."""
    return cascade_feature_fusion_reference(low, high, weight_low, scale_low, shift_low, weight_high, scale_high,
                                            shift_high, dilation, align_corners)


def direct_flops(low_shape, high_shape, out_channels: int) -> int:
    """The definition's arithmetic: the 3x3 conv over the upsampled map and the 1x1 projection, both at
    high's resolution, 2 FLOPs per multiply-add."""
    batch, low_channels = low_shape[:2]
    high_channels, height, width = high_shape[1:]
    return 2 * batch * height * width * out_channels * (9 * low_channels + high_channels)


def dense_flops(low_shape, high_shape, out_channels: int, dilation: int, align_corners: bool) -> int:
    """The cheapest exact evaluation's arithmetic: on the shortcut's geometry the 3x3 conv runs at low's
    resolution, and so do the nine per-tap channel mixes of the tap-first evaluation (any zoom that at least
    doubles the pixel count); elsewhere the definition's."""
    batch, low_channels, h, w = low_shape
    high_channels, height, width = high_shape[1:]
    if not (exact_shortcut(h, w, height, width, dilation, align_corners) or tap_first(h, w, height, width)):
        return direct_flops(low_shape, high_shape, out_channels)
    return 2 * batch * out_channels * (h * w * 9 * low_channels + height * width * high_channels)


def _case(stage: str, align_corners: bool, batch: int, dtype: torch.dtype) -> Case:
    low_channels, (h, w), high_channels, (height, width) = STAGES[stage]
    params = {"dilation": DILATION, "align_corners": align_corners}
    shortcut = exact_shortcut(h, w, height, width, DILATION, align_corners)
    low_shape = (batch, low_channels, h, w)
    high_shape = (batch, high_channels, height, width)
    out_shape = (batch, OUT_CHANNELS, height, width)
    elements = (math.prod(low_shape) + math.prod(high_shape) + math.prod(out_shape)
                + OUT_CHANNELS * (9 * low_channels + high_channels + 4))  # both weights and four BN vectors
    flops = direct_flops(low_shape, high_shape, OUT_CHANNELS)
    dense = dense_flops(low_shape, high_shape, OUT_CHANNELS, DILATION, align_corners)
    variant = f"{stage}-{'shortcut' if shortcut else 'general'}"
    return Case(op=NAME, variant=variant, shape=low_shape, dtype=dtype, params=params,
                min_bytes=elements * dtype.itemsize, flops=flops, dense_flops=dense,
                details={"high_shape": list(high_shape), "out_shape": list(out_shape)})


def cases(device: torch.device, quick: bool) -> list[Case]:
    # Batch 16 on a few CPU cores costs seconds a call in eager and the float64 reference: minutes per case.
    grid = case_grid(quick, (1,) if device.type == "cpu" else BATCHES, device_dtypes(device))
    return [_case(stage, align_corners, batch, dtype)
            for dtype, batch in grid for stage in STAGES for align_corners in ALIGN_CORNERS]


def make_inputs(case: Case, device: torch.device) -> tuple[torch.Tensor, ...]:
    """low, high, weight_low, weight_high, scale_low, shift_low, scale_high, shift_high: the op's order.

    Kaiming-scaled weights and BN-like scales and shifts, so that the two branches have comparable
    magnitudes and the ReLU clips about half the outputs, as in a trained network.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    low_channels, high_channels = case.shape[1], case.details["high_shape"][1]

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return std * torch.randn(shape, generator=generator, device=device)

    def scale() -> torch.Tensor:
        return 0.5 + torch.rand(OUT_CHANNELS, generator=generator, device=device)

    tensors = (randn(*case.shape), randn(*case.details["high_shape"]),
               randn(OUT_CHANNELS, low_channels, 3, 3, std=(2 / (9 * low_channels)) ** 0.5),
               randn(OUT_CHANNELS, high_channels, 1, 1, std=(2 / high_channels) ** 0.5),
               scale(), randn(OUT_CHANNELS, std=0.1), scale(), randn(OUT_CHANNELS, std=0.1))
    return tuple(t.to(case.dtype) for t in tensors)


def reference(case: Case, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return eager_cascade_feature_fusion(*(t.double() for t in inputs), **case.params)


def _eager(case: Case) -> Provider:
    return partial(eager_cascade_feature_fusion, **case.params)


def _icnet(backend: str) -> ProviderBuilder:
    return lambda case: partial(cascade_feature_fusion, **case.params, backend=backend)


def providers(device: torch.device) -> dict[str, ProviderBuilder]:
    return standard_providers(device, _eager, _icnet)
