"""Cascade feature fusion geometry for the Python side (Triton launcher, fake kernel, benchmarks): the twin of
csrc/common/cff_geometry.h, which the C++ and CUDA kernels use."""

import torch


def exact_shortcut(h: int, w: int, H: int, W: int, dilation: int, align_corners: bool) -> bool:
    """When up is the exact 2x zoom with align_corners and the dilation is 2, the 3x3 conv can run at low
    resolution (cff_exact_shortcut in csrc/common/cff_geometry.h)."""
    return align_corners and dilation == 2 and H == 2 * h - 1 and W == 2 * w - 1 and H >= 3 and W >= 3


def tap_first(h: int, w: int, H: int, W: int) -> bool:
    """When low has at most half of high's pixels, the CPU kernel mixes channels per tap at low resolution
    and gathers nine bilinear taps per output pixel (cff_tap_first in csrc/common/cff_geometry.h)."""
    return 2 * h * w <= H * W


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor that is not also plainly contiguous, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_memory_format(high: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout: high's (cff_output_format in csrc/common/cff_args.h)."""
    return memory_format_of(high)
