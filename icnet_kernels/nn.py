"""nn.Modules over the fused ops."""

from collections.abc import Sequence

import torch
from torch import nn

from icnet_kernels.ops import Pair, pyramid_pool_sum
from icnet_kernels.ops.cascade_feature_fusion import (cascade_feature_fusion_folded, fold_bias, fold_dtype,
                                                      fold_scale, flat_weight_high)


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


class InferenceCache:
    """A value computed from some tensors (a module's parameters and buffers), kept between inference calls
    and recomputed when any of them is replaced or changed in place (its data pointer or version moves).
    With autograd recording or under torch.compile the value is always recomputed, so it stays in the graph.

    The kept value is computed outside inference mode, so it is an ordinary tensor whose own changes the
    caches built on it (the Triton kernels' weight layouts) can follow. Inference tensors (a module created
    under torch.inference_mode) keep no version counter: from those the value is computed on every call."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, tensors, compute, *extra_key):
        tensors = [t for t in tensors if t is not None]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return compute()
        key = (tuple((t.data_ptr(), t._version) for t in tensors), extra_key)
        if self._key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value


class CascadeFeatureFusion(nn.Module):
    """ICNet's cascade feature fusion unit with ordinary Conv2d/BatchNorm2d parameters.

    relu(bn_low(conv_low(resize(low))) + bn_high(conv_high(high))), conv_low a 3x3 conv with the given
    dilation. When both BatchNorms use running statistics (eval mode, or frozen in training) they are folded
    and the fused op runs; in inference the folded weights are kept until a parameter or statistic changes,
    so a call dispatches the fused op alone. With live batch statistics the plain composition runs.
    forward(..., return_upsampled=True) also returns resize(low) for the cascade-label-guidance classifier.
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
        self._folded = InferenceCache()

    def _fold(self, dtype: torch.dtype):
        """(weight_low, weight_high [Co, Ch], bias) with both BatchNorms folded in, in dtype."""
        scale_low, shift_low = folded_batch_norm(self.bn_low)
        scale_high, shift_high = folded_batch_norm(self.bn_high)
        weight_low = fold_scale(self.conv_low.weight, scale_low).to(dtype)
        weight_high = fold_scale(flat_weight_high(self.conv_high.weight), scale_high).to(dtype)
        bias = fold_bias(weight_low.shape[0], shift_low, shift_high, self.conv_low.weight).to(dtype)
        return weight_low, weight_high, bias

    def forward(self, low: torch.Tensor, high: torch.Tensor, return_upsampled: bool = False):
        if batch_statistics(self.bn_low) or batch_statistics(self.bn_high):
            up = nn.functional.interpolate(low, size=high.shape[-2:], mode="bilinear",
                                           align_corners=self.align_corners)
            out = torch.relu(self.bn_low(self.conv_low(up)) + self.bn_high(self.conv_high(high)))
            return (out, up) if return_upsampled else out
        # with autograd recording or under torch.compile the cache folds on every call, inside the graph
        tensors = (self.conv_low.weight, self.conv_high.weight, *_batch_norm_tensors(self.bn_low),
                   *_batch_norm_tensors(self.bn_high))
        weight_low, weight_high, bias = self._folded.get(tensors, lambda: self._fold(low.dtype), low.dtype)
        out = cascade_feature_fusion_folded(low, high, weight_low, weight_high, bias, self.dilation,
                                            self.align_corners, self.backend)
        if not return_upsampled:
            return out
        return out, nn.functional.interpolate(low, size=high.shape[-2:], mode="bilinear",
                                              align_corners=self.align_corners)


def _batch_norm_tensors(bn: nn.BatchNorm2d):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


def batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """True when bn normalises with the current batch's statistics rather than running ones."""
    return bn.training or bn.running_mean is None


def folded_batch_norm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, from the running statistics, computed in
    float32 (float64 for a float64 BatchNorm) whatever dtype the BatchNorm is stored in."""
    dtype = fold_dtype(bn.running_var.dtype)
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift
