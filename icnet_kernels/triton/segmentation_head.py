"""Segmentation head in Triton: a 1x1 classifier and an exact integer bilinear zoom (align_corners) in one
kernel, writing logits or, in the labels variant, only their argmax.

With zoom z and align_corners the output of size (h-1)*z+1 samples the input's bilinear interpolant at
steps of 1/z: output row Y = i*z + a reads input rows i and i+1 with weight a/z, and likewise for columns.
A program owns one input row i (the output rows i*z .. i*z+z-1) and a block of output columns. It
interpolates the features along the row first (two loads per pixel and channel, the second skipped where
its weight is 0), classifies the two interpolated rows with one GEMM each (the classifier commutes with
the resize: both are linear, and the interpolation weights sum to one), and writes the z output rows as
lerps of the two logit rows. The 128-channel map is thus read about twice per output column and never
resized at full resolution; only the num_classes logits (or one uint8 label) per pixel are written.
"""

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.segmentation_head import zoomed_size
from icnet_kernels.triton.index_math import batch_slices, launch_grid
from icnet_kernels.triton.weight_layout import laid_out


@triton.jit
def _row_blend(row_ptr, offs_k, k_ok, j0, j1, lx, x_ok, s_fc, s_fx):
    """(1 - lx) * f[j0] + lx * f[j1] for a [BLOCK_X, BLOCK_K] tile of one feature row, in float32. The j1
    source is read only where its weight is non-zero, so a NaN there does not reach outputs that do not
    depend on it."""
    channel = row_ptr + offs_k[None, :].to(tl.int64) * s_fc
    mask = x_ok[:, None] & k_ok[None, :]
    left = tl.load(channel + (j0 * s_fx)[:, None], mask=mask, other=0.0).to(tl.float32)
    has_right = lx > 0.0
    right = tl.load(channel + (j1 * s_fx)[:, None], mask=mask & has_right[:, None], other=0.0).to(tl.float32)
    return tl.where(has_right[:, None], (1.0 - lx)[:, None] * left + lx[:, None] * right, left)


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _segmentation_head_fwd_kernel(
    feat_ptr, weight_ptr, bias_ptr, out_ptr,
    K, h, w, C, H, W,
    s_fn, s_fc, s_fy, s_fx, s_on, s_oc, s_oy, s_ox,
    ZOOM: tl.constexpr, LABELS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # x counts the feature rows times the output's column blocks: CUDA caps y at 65535 programs
    blocks_x = tl.cdiv(W, BLOCK_X)
    pid_x = tl.program_id(0) % blocks_x
    i = tl.program_id(0) // blocks_x
    n = tl.program_id(2).to(tl.int64)
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = offs_x < W
    j0 = offs_x // ZOOM
    lx = (offs_x - j0 * ZOOM).to(tl.float32) / ZOOM
    j1 = tl.minimum(j0 + 1, w - 1)
    i1 = tl.minimum(i + 1, h - 1)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    dot_dtype = feat_ptr.dtype.element_ty

    feat_n = feat_ptr + n * s_fn
    top_ptr = feat_n + i.to(tl.int64) * s_fy
    bottom_ptr = feat_n + i1.to(tl.int64) * s_fy
    top = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
    bottom = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        weight = tl.load(weight_ptr + offs_k[:, None] * C + offs_c[None, :], mask=k_ok[:, None] & c_ok[None, :],
                         other=0.0)
        a = _row_blend(top_ptr, offs_k, k_ok, j0, j1, lx, x_ok, s_fc, s_fx)
        top += tl.dot(a.to(dot_dtype), weight, input_precision=PRECISION)
        a = _row_blend(bottom_ptr, offs_k, k_ok, j0, j1, lx, x_ok, s_fc, s_fx)
        bottom += tl.dot(a.to(dot_dtype), weight, input_precision=PRECISION)
    bias = tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    top += bias
    bottom += bias

    out_n = out_ptr + n * s_on
    pixel = (offs_x * s_ox)[:, None]
    for a in tl.static_range(ZOOM):
        y = i * ZOOM + a
        if a == 0:  # the input row itself: the next row has weight 0 and is not read
            logits = top
        else:
            ly = a / ZOOM
            logits = (1.0 - ly) * top + ly * bottom
        row_ok = x_ok & (y < H)
        row = out_n + y.to(tl.int64) * s_oy
        if LABELS:
            # torch.argmax's answer: the first NaN if there is one, else the first maximum
            is_nan = logits != logits
            first_nan = tl.min(tl.where(is_nan, offs_c[None, :], BLOCK_C), axis=1)
            finite = tl.where(c_ok[None, :] & ~is_nan, logits, float("-inf"))
            label = tl.where(first_nan < BLOCK_C, first_nan, tl.argmax(finite, axis=1, tie_break_left=True))
            tl.store(row + offs_x * s_ox, label.to(tl.uint8), mask=row_ok)
        else:
            tl.store(row + pixel + (offs_c.to(tl.int64) * s_oc)[None, :], logits.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & c_ok[None, :])


def _tiles(num_classes: int, channels: int, width: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_X, BLOCK_K, BLOCK_C, num_warps). tl.dot needs every block dimension >= 16. Under the
    interpreter larger tiles mean fewer interpreted programs. float32's full-precision dots unroll into
    scalar FMAs: smaller tiles keep them in the registers."""
    block_c = max(16, triton.next_power_of_2(num_classes))
    if triton_interpreted():
        return (max(16, min(128, triton.next_power_of_2(width))), max(16, min(128, triton.next_power_of_2(channels))),
                block_c, 1)
    return (32, 16, block_c, 4) if dtype == torch.float32 else (64, 32, block_c, 4)


def segmentation_head_triton(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, zoom: int,
                             labels: bool) -> torch.Tensor:
    """Logits [N, C, (h-1)*zoom+1, (w-1)*zoom+1] in features' dtype and memory format, or (labels) their
    argmax [N, H', W'] as uint8. weight [C, K] and bias [C] in features' dtype; arguments already checked."""
    n, k, h, w = features.shape
    c = weight.shape[0]
    height, width = zoomed_size(features, zoom)
    if labels:
        out = torch.empty((n, height, width), dtype=torch.uint8, device=features.device)
        out_strides = (out.stride(0), 0, out.stride(1), out.stride(2))
    else:
        out = torch.empty((n, c, height, width), dtype=features.dtype, device=features.device,
                          memory_format=memory_format_of(features))
        out_strides = out.stride()
    if out.numel() == 0:
        return out
    weight_t = laid_out(weight, "transposed", lambda t: t.t().contiguous())  # K x C
    block_x, block_k, block_c, num_warps = _tiles(c, k, width, features.dtype)
    for items in batch_slices(n):
        grid = launch_grid("segmentation_head", (triton.cdiv(width, block_x) * h, 1, out[items].shape[0]),
                           ("feature rows x output column blocks", "", "batch items"))
        _segmentation_head_fwd_kernel[grid](
            features[items], weight_t, bias, out[items], k, h, w, c, height, width, *features.stride(), *out_strides,
            ZOOM=zoom, LABELS=labels, PRECISION="ieee" if features.dtype == torch.float32 else "tf32",
            BLOCK_X=block_x, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=num_warps,
        )
    return out
