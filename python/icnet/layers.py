"""Building blocks of ICNet, each with plain Conv2d/BatchNorm2d parameters.

ConvBN folds its BatchNorm into the convolution when the model is built "fused" and BN uses running
statistics; the fold is cached and recomputed only when a parameter or statistic changes. In inference
on the CPU the fused build also hands the ReLU and the residual sum to oneDNN as post-ops of the
convolution (the path torch.compile's CPU backend takes), so they cost no pass over memory of their own;
on a GPU, in float16 and float32, cuDNN's fused convolution + bias (+ residual) + ReLU does the same.
"""

import torch
import torch.nn.functional as F
from torch import nn

from icnet_kernels.nn import batch_statistics, folded_batch_norm


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
        self._folded = None  # (versions, weight, bias)

    def _fold(self):
        scale, shift = folded_batch_norm(self.bn)
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), shift

    def _folded_params(self):
        """The BN-folded (weight, bias); cached for inference, recomputed when a tensor changes."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._fold()  # training through a frozen BN: the fold stays in the autograd graph
        tensors = (self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)
        versions = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._folded is None or self._folded[0] != versions:
            self._folded = (versions, *self._fold())
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv -> BN (-> + residual) (-> ReLU)."""
        if self.fused and not batch_statistics(self.bn):
            weight, bias = self._folded_params()
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
            if _onednn_post_ops(x):
                return _conv_post_ops(x, weight, bias, self.conv, self.relu, residual)
            if self.relu and _cudnn_fused_relu(x):
                return _cudnn_conv_relu(x, weight, bias, self.conv, residual)
            y = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding, self.conv.dilation)
        else:
            y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return F.relu(y, inplace=True) if self.relu else y


def _onednn_post_ops(x: torch.Tensor) -> bool:
    """oneDNN's fused conv epilogues serve CPU inference in float32 and bfloat16."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available())


def _conv_post_ops(x, weight, bias, conv: nn.Conv2d, relu: bool, residual):
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    unary = "relu" if relu else "none"
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, unary, [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add", None,
                                                          unary if relu else None, [], "")


def _cudnn_fused_relu(x: torch.Tensor) -> bool:
    """cuDNN's fused convolution + bias (+ residual) + ReLU serves GPU inference in float16 and float32.
    Not yet run on a GPU by this project (the GPU parity tests will check it)."""
    return (x.device.type == "cuda" and x.dtype in (torch.float16, torch.float32) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.backends.cudnn.is_available()
            and torch.backends.cudnn.enabled)


def _cudnn_conv_relu(x, weight, bias, conv: nn.Conv2d, residual):
    args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, *args)
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
