"""Index math shared by the Triton kernels: bilinear sources in PyTorch's arithmetic (as csrc/common/resize.h)
and the width of in-image offsets."""

import torch
import triton
import triton.language as tl

# In-image offsets are int32, which halves the index arithmetic, unless a tensor's batch item spans 2^31
# elements or more; the batch offset is always computed in int64.
INT32_SPAN = 2**31


def image_span(t: torch.Tensor) -> int:
    """How many elements apart the first and last elements of one batch item lie, plus one."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def needs_wide_index(images, weights=()) -> bool:
    """Whether an offset within one batch item of images ([N, ...] tensors, None for absent ones) or within
    a weight may not fit int32: the kernels' WIDE."""
    return (any(t is not None and image_span(t) >= INT32_SPAN for t in images)
            or any(t is not None and t.numel() >= INT32_SPAN for t in weights))


@triton.jit
def in_image_index(v, WIDE: tl.constexpr):
    """v as an in-image offset: int64 where WIDE, else as it is (int32)."""
    if WIDE:
        v = v.to(tl.int64)
    return v


def resize_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """resize_scale of csrc/common/resize.h: the source step per output pixel."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return in_size / out_size


@triton.jit
def source_index(dst, in_size, scale, ALIGN: tl.constexpr):
    """Bilinear source (i0, i1, weight of i1) of output position dst; i0 and i1 in dst's integer type."""
    if ALIGN:
        src = dst.to(tl.float32) * scale
    else:
        src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(dst.dtype), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam
