"""Plain-PyTorch definitions of the icnet ops: every kernel is tested against these.

Summed pyramid pooling is written with explicit 1-D operator matrices (pooling and bilinear resize are
both separable), not with F.avg_pool2d / F.interpolate, so that the tests can check this definition
against that independent composition.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool_matrix(length: int, bins: int, kernel: int | None = None, stride: int | None = None,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """[bins, length]: weight of input position p in pooled position i along one axis.

    kernel/stride None means PyTorch's adaptive pooling windows [floor(i*L/n), ceil((i+1)*L/n)).
    """
    i = torch.arange(bins, device=device)
    if kernel is None:
        begin = (i * length) // bins
        end = ((i + 1) * length + bins - 1) // bins
    else:
        begin = i * stride
        end = begin + kernel
    p = torch.arange(length, device=device)
    inside = (p[None, :] >= begin[:, None]) & (p[None, :] < end[:, None])
    return inside.to(dtype) / (end - begin).to(dtype)[:, None]


def interp_matrix(bins: int, length: int, align_corners: bool, dtype=torch.float32, device=None) -> torch.Tensor:
    """[bins, length]: weight of source position i in output position p of a 1-D linear resize."""
    p = torch.arange(length, device=device, dtype=dtype)
    if align_corners:
        scale = (bins - 1) / (length - 1) if length > 1 else 0.0
        src = p * scale
    else:
        src = ((p + 0.5) * (bins / length) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=bins - 1)
    lam = (src - i0.to(dtype)).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=bins - 1)
    matrix = torch.zeros(bins, length, dtype=dtype, device=device)
    cols = torch.arange(length, device=device)
    matrix.index_put_((i0, cols), 1 - lam, accumulate=True)
    matrix.index_put_((i1, cols), lam, accumulate=True)
    return matrix


def pyramid_bin_matrices(height: int, width: int, bins: Sequence[int],
                         kernel_sizes: Sequence[Sequence[int]] | None, strides: Sequence[Sequence[int]] | None,
                         align_corners: bool, dtype=torch.float32, device=None):
    """Per bin: (pool_h [n,H], pool_w [n,W], interp_h [n,H], interp_w [n,W])."""
    matrices = []
    for b, n in enumerate(bins):
        kh, kw = kernel_sizes[b] if kernel_sizes is not None else (None, None)
        sh, sw = strides[b] if strides is not None else (None, None)
        matrices.append((
            pool_matrix(height, n, kh, sh, dtype, device),
            pool_matrix(width, n, kw, sw, dtype, device),
            interp_matrix(n, height, align_corners, dtype, device),
            interp_matrix(n, width, align_corners, dtype, device),
        ))
    return matrices


def pyramid_pool_sum_reference(x: torch.Tensor, bins: Sequence[int] = (1, 2, 3, 6),
                               kernel_sizes: Sequence[Sequence[int]] | None = None,
                               strides: Sequence[Sequence[int]] | None = None,
                               align_corners: bool = True) -> torch.Tensor:
    """out = x + sum_b resize(avgpool_b(x), x's size), bilinear; accumulates in float32 (float64 for float64)."""
    dtype = _compute_dtype(x.dtype)
    xc = x.to(dtype)
    out = xc.clone()
    for pool_h, pool_w, interp_h, interp_w in pyramid_bin_matrices(
            x.shape[-2], x.shape[-1], bins, kernel_sizes, strides, align_corners, dtype, x.device):
        pooled = torch.einsum("ih,nchw,jw->ncij", pool_h, xc, pool_w)
        out = out + torch.einsum("ih,ncij,jw->nchw", interp_h, pooled, interp_w)
    return out.to(x.dtype)


def cascade_feature_fusion_reference(low: torch.Tensor, high: torch.Tensor,
                                     weight_low: torch.Tensor, scale_low: torch.Tensor, shift_low: torch.Tensor,
                                     weight_high: torch.Tensor, scale_high: torch.Tensor, shift_high: torch.Tensor,
                                     dilation: int = 2, align_corners: bool = True,
                                     return_upsampled: bool = False):
    """Cascade feature fusion, as separate ATen ops:

        up  = bilinear_resize(low, high's size)
        out = relu((conv3x3(up, weight_low, dilation, padding=dilation) * scale_low + shift_low)
                   + (conv1x1(high, weight_high) * scale_high + shift_high))

    scale/shift are per output channel (BatchNorm in inference form). With return_upsampled, also returns
    up, which ICNet's cascade label guidance classifies during training.
    """
    up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=align_corners)
    branch_low = F.conv2d(up, weight_low, padding=dilation, dilation=dilation)
    branch_high = F.conv2d(high, weight_high.reshape(weight_high.shape[0], -1, 1, 1))
    per_channel = (1, -1, 1, 1)
    out = torch.relu(branch_low * scale_low.reshape(per_channel) + shift_low.reshape(per_channel)
                     + branch_high * scale_high.reshape(per_channel) + shift_high.reshape(per_channel))
    return (out, up) if return_upsampled else out


def segmentation_head_reference(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, zoom: int,
                                labels: bool = False) -> torch.Tensor:
    """ICNet's head, as separate ATen ops: the exact integer zoom of Caffe's Interp (bilinear, align_corners,
    output (h-1)*zoom+1), then the 1x1 classifier weight [C, K] (or [C, K, 1, 1]) with bias [C]. With labels,
    the argmax over the classes as uint8 instead of the logits."""
    h, w = features.shape[-2:]
    up = F.interpolate(features, size=((h - 1) * zoom + 1, (w - 1) * zoom + 1), mode="bilinear",
                       align_corners=True)
    logits = F.conv2d(up, weight.reshape(weight.shape[0], -1, 1, 1), bias)
    return logits.argmax(1).to(torch.uint8) if labels else logits


def max_pool_reference(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Max pooling as ATen computes it (floor mode, no dilation): the values, without indices."""
    return F.max_pool2d(x, kernel_size, stride, padding)


def conv2d_epilogue_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              residual: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
                              dilation: int = 1, relu: bool = False) -> torch.Tensor:
    """A convolution's inference epilogue as separate ATen ops: conv2d + bias (+ residual) (+ ReLU)."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y
