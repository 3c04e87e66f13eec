"""Building blocks of ICNet, each with plain Conv2d/BatchNorm2d parameters.

ConvBN folds its BatchNorm into the convolution when the model is built "fused" and BN uses running
statistics; the fold is computed in float32 whatever the model's dtype, cached, and recomputed only when a
parameter or statistic changes. In inference the fused build also hands the epilogue to the convolution
library where one fused call exists: on the CPU the ReLU and the residual sum become oneDNN post-ops (the
path torch.compile's CPU backend takes), so they cost no pass over memory of their own; on a GPU, in
float16 and float32, a convolution whose output is summed with a residual runs cuDNN's fused convolution
+ bias + residual + ReLU. A library may have no fused implementation for some shape (cuDNN's runtime
fusion engines, say): a module whose fused call raises falls back to the plain path and keeps it
(ConvBN.epilogue_fallback says why; epilogue_fallbacks lists them for a model).
"""

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.nn import InferenceCache, batch_statistics, folded_batch_norm

log = logging.getLogger(__name__)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, relu: bool = True,
                 fused: bool = False, channel_groups: tuple[str, str] | None = None):
        super().__init__()
        self.channel_groups = channel_groups  # (input, output) channel group names, for filter pruning
        padding = dilation * (kernel // 2)
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu
        self.fused = fused
        self._folded = InferenceCache()
        # Why the fused epilogue was given up for the plain path (the library's error), None while it serves.
        self.epilogue_fallback: str | None = None

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of conv followed by BN, in float32 (float64 for a float64 model): in half precision
        the weight's product with the scale would round once more, before the cast to the input's dtype."""
        scale, shift = folded_batch_norm(self.bn)
        return self.conv.weight.to(scale.dtype) * scale.reshape(-1, 1, 1, 1), shift

    def _folded_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN-folded (weight, bias) in dtype; kept for inference, recomputed when a tensor changes (with
        autograd recording or under torch.compile the fold stays in the graph)."""
        def fold():
            weight, bias = self._fold()
            return weight.to(dtype), bias.to(dtype)

        tensors = (self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)
        return self._folded.get(tensors, fold, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv -> BN (-> + residual) (-> ReLU)."""
        if self.fused and not batch_statistics(self.bn):
            weight, bias = self._folded_params(x.dtype)
            failed = None
            if self.epilogue_fallback is None and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
                epilogue = fused_epilogue(x.device.type, x.dtype, lambda: _channels_last(x, weight), self.relu,
                                          residual is not None)
                if epilogue is not None:
                    try:
                        return epilogue(x, weight, bias, self.conv, self.relu, residual)
                    except RuntimeError as error:
                        failed = f"{epilogue.__name__}: {str(error).strip().splitlines()[0]}"
            y = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding, self.conv.dilation)
            if failed is not None:  # the plain path ran where the fused one raised: the library lacks it here
                self.epilogue_fallback = failed
                log.info("icnet: %s on %s %s input falls back to the plain path (%s)", self.conv, x.dtype,
                         tuple(x.shape), failed)
        else:
            y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y, inplace=True) if self.relu else y


def epilogue_fallbacks(model: nn.Module) -> dict[str, str]:
    """{submodule name: reason} for every convolution of model (a ConvBN, or an inference plan's folded one)
    whose fused epilogue fell back to the plain path."""
    return {name: module.epilogue_fallback for name, module in model.named_modules()
            if getattr(module, "epilogue_fallback", None) is not None}


def _channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.channels_last in (memory_format_of(x), memory_format_of(weight))


def fused_epilogue(device_type: str, dtype: torch.dtype, channels_last: Callable[[], bool], relu: bool,
                   residual: bool):
    """The library call that runs conv + bias (+ residual) (+ ReLU) in one for such an inference input, or
    None where the plain path serves (the caller checks that autograd and torch.compile are off).
    channels_last() says whether the convolution runs channels_last; it is asked only where that matters."""
    if device_type == "cpu" and torch.backends.mkldnn.is_available() and (
            dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bfloat16_supported())):
        if residual and relu and dtype != torch.float32 and not channels_last():
            # oneDNN fuses the residual only channels_last; torch's unfused stand-in (add_relu) has no
            # bfloat16 kernel and fails an internal assert
            return None
        return _onednn_conv_post_ops
    if (device_type == "cuda" and residual and relu and dtype in (torch.float16, torch.float32)
            and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        # Only with a residual: torch.cudnn_convolution_relu passes its own uninitialised output to cuDNN
        # as the residual with weight 0, and 0 x NaN is NaN.
        return _cudnn_conv_add_relu
    return None


@functools.cache
def onednn_bfloat16_supported() -> bool:
    """Whether oneDNN has a bfloat16 convolution on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT,
    and without them every call fails."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _onednn_conv_post_ops(x, weight, bias, conv: nn.Conv2d, relu: bool, residual):
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    unary = "relu" if relu else "none"
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, unary, [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add", None,
                                                          unary if relu else None, [], "")


def _cudnn_conv_add_relu(x, weight, bias, conv: nn.Conv2d, relu: bool, residual):
    args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, *args)


class Bottleneck(nn.Module):
    """ResNet bottleneck as in PSPNet's Caffe model: 1x1 reduce (carrying the stride), 3x3 (dilated),
    1x1 increase, projection shortcut when the shape changes, ReLU after the sum."""

    def __init__(self, channels: dict[str, int], groups: tuple[str, str, str, str], stride: int = 1,
                 dilation: int = 1, fused: bool = False):
        """groups: the channel groups (input, reduce's output, conv3x3's output, output) and channels their widths;
        the projection shortcut exists when input and output are different groups or the block strides."""
        super().__init__()
        cin, reduce, conv3x3, cout = groups
        self.reduce = ConvBN(channels[cin], channels[reduce], 1, stride, fused=fused, channel_groups=(cin, reduce))
        self.conv3x3 = ConvBN(channels[reduce], channels[conv3x3], 3, 1, dilation, fused=fused,
                              channel_groups=(reduce, conv3x3))
        self.increase = ConvBN(channels[conv3x3], channels[cout], 1, relu=True, fused=fused,  # ReLU after the sum
                               channel_groups=(conv3x3, cout))
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = ConvBN(channels[cin], channels[cout], 1, stride, relu=False, fused=fused,
                               channel_groups=(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.increase(self.conv3x3(self.reduce(x)), residual=shortcut)


def caffe_resize(x: torch.Tensor, zoom: int | None = None, shrink: int | None = None, size=None) -> torch.Tensor:
    """Caffe's Interp layer: bilinear with align_corners=True; zoom z gives (H-1)*z+1, shrink s (H-1)/s+1."""
    if size is None:
        h, w = x.shape[-2:]
        size = ((h - 1) * zoom + 1, (w - 1) * zoom + 1) if zoom else ((h - 1) // shrink + 1, (w - 1) // shrink + 1)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def shrink2(x: torch.Tensor) -> torch.Tensor:
    """caffe_resize(x, shrink=2): every other pixel where a side is odd (exactly the resize's values for
    finite inputs), the bilinear resize elsewhere."""
    if odd_sides(x):
        return x[:, :, ::2, ::2].contiguous(memory_format=memory_format_of(x))
    return caffe_resize(x, shrink=2)


def odd_sides(x_or_size) -> bool:
    """Whether both spatial sides are odd: where shrink2 is a strided read."""
    h, w = x_or_size.shape[-2:] if isinstance(x_or_size, torch.Tensor) else x_or_size
    return h % 2 == 1 and w % 2 == 1


class ReferenceCascadeFeatureFusion(nn.Module):
    """The cascade feature fusion unit as separate plain layers; same parameter names as the fused
    icnet_kernels.CascadeFeatureFusion, so the two share state_dicts."""

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, dilation: int = 2):
        super().__init__()
        self.conv_low = nn.Conv2d(low_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_low = nn.BatchNorm2d(out_channels)
        self.conv_high = nn.Conv2d(high_channels, out_channels, 1, bias=False)
        self.bn_high = nn.BatchNorm2d(out_channels)

    def forward(self, low: torch.Tensor, high: torch.Tensor, return_upsampled: bool = False):
        up = caffe_resize(low, size=high.shape[-2:])
        out = F.relu(self.bn_low(self.conv_low(up)) + self.bn_high(self.conv_high(high)))
        return (out, up) if return_upsampled else out
