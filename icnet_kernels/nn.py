"""nn.Modules over the fused ops."""

from collections.abc import Sequence

import torch
from torch import nn

from icnet_kernels.ops import Pair, cascade_feature_fusion, pyramid_pool_sum


class PyramidPoolingSum(nn.Module):
    """x + sum_b resize(avgpool_b(x)): PSPNet's pyramid pooling without per-bin convolutions, as in ICNet.

    Holds no parameters. kernel_sizes/strides None selects adaptive pooling (any input size); explicit
    values reproduce the released ICNet for its 33x65 map.
    """

    def __init__(self, bins: Sequence[int] = (1, 2, 3, 6), kernel_sizes: Sequence[int | Pair] | None = None,
                 strides: Sequence[int | Pair] | None = None, align_corners: bool = True,
                 backend: str | None = None):
        super().__init__()
        self.bins = tuple(bins)
        self.kernel_sizes = None if kernel_sizes is None else tuple(kernel_sizes)
        self.strides = None if strides is None else tuple(strides)
        self.align_corners = align_corners
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pyramid_pool_sum(x, self.bins, self.kernel_sizes, self.strides, self.align_corners, self.backend)

    def extra_repr(self) -> str:
        geometry = "adaptive" if self.kernel_sizes is None else f"kernel_sizes={self.kernel_sizes}, strides={self.strides}"
        return f"bins={self.bins}, {geometry}, align_corners={self.align_corners}"


class CascadeFeatureFusion(nn.Module):
    """ICNet's cascade feature fusion unit with ordinary Conv2d/BatchNorm2d parameters.

    relu(bn_low(conv_low(resize(low))) + bn_high(conv_high(high))), conv_low a 3x3 conv with the given
    dilation. When both BatchNorms use running statistics (eval mode, or frozen in training) they are folded
    and the fused op runs; with live batch statistics the plain composition runs. forward(...,
    return_upsampled=True) also returns resize(low) for the cascade-label-guidance classifier.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, dilation: int = 2,
                 align_corners: bool = True, backend: str | None = None):
        super().__init__()
        self.conv_low = nn.Conv2d(low_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_low = nn.BatchNorm2d(out_channels)
        self.conv_high = nn.Conv2d(high_channels, out_channels, 1, bias=False)
        self.bn_high = nn.BatchNorm2d(out_channels)
        self.dilation = dilation
        self.align_corners = align_corners
        self.backend = backend

    def forward(self, low: torch.Tensor, high: torch.Tensor, return_upsampled: bool = False):
        if batch_statistics(self.bn_low) or batch_statistics(self.bn_high):
            up = nn.functional.interpolate(low, size=high.shape[-2:], mode="bilinear",
                                           align_corners=self.align_corners)
            out = torch.relu(self.bn_low(self.conv_low(up)) + self.bn_high(self.conv_high(high)))
            return (out, up) if return_upsampled else out
        scale_low, shift_low = folded_batch_norm(self.bn_low)
        scale_high, shift_high = folded_batch_norm(self.bn_high)
        return cascade_feature_fusion(low, high, self.conv_low.weight, self.conv_high.weight, scale_low, shift_low,
                                      scale_high, shift_high, self.dilation, self.align_corners, return_upsampled,
                                      self.backend)


def batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """True when bn normalises with the current batch's statistics rather than running ones."""
    return bn.training or bn.running_mean is None


def folded_batch_norm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, from the running statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
