"""Index math shared by the Triton kernels: bilinear sources in PyTorch's arithmetic (as csrc/common/resize.h),
the width of in-image offsets and the launch grids' limits."""

import torch
import triton
import triton.language as tl

# In-image offsets are int32, which halves the index arithmetic, unless a tensor's batch item spans 2^31
# elements or more; the batch offset is always computed in int64.
INT32_SPAN = 2**31

# CUDA caps a launch grid at 2^31 - 1 programs along x and 65535 along y and z. The kernels take the batch
# item from program_id(2) (or, with several programs per item, from a part of it), so a larger batch is
# launched in slices (batch_slices); launch_grid says which input is too large where nothing can be sliced.
GRID_X_LIMIT = 2**31 - 1
GRID_YZ_LIMIT = 65535


def image_span(t: torch.Tensor) -> int:
    """How many elements apart the first and last elements of one batch item lie, plus one."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def needs_wide_index(images, weights=()) -> bool:
    """Whether an offset within one batch item of images ([N, ...] tensors, None for absent ones) or within
    a weight may not fit int32: the kernels' WIDE."""
    return (any(t is not None and image_span(t) >= INT32_SPAN for t in images)
            or any(t is not None and t.numel() >= INT32_SPAN for t in weights))


def batch_slices(n: int, programs_per_item: int = 1, along: str = "z") -> list[slice]:
    """The batch [0, n) in slices, each small enough that programs_per_item programs per item fit one
    launch grid's dimension along ("x", or "z" as y)."""
    limit = GRID_X_LIMIT if along == "x" else GRID_YZ_LIMIT
    step = max(1, limit // programs_per_item)
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def launch_grid(op: str, grid: tuple[int, int, int], axes: tuple[str, str, str]) -> tuple[int, int, int]:
    """grid as it is, or ValueError from op naming what the dimension past CUDA's limit counts (axes: what
    each of x, y and z counts, e.g. "weight's output channels")."""
    for size, limit, axis, what in zip(grid, (GRID_X_LIMIT, GRID_YZ_LIMIT, GRID_YZ_LIMIT), "xyz", axes):
        if size > limit:
            raise ValueError(f"{op}: too many {what} for one launch: {size} programs along the grid's {axis} "
                             f"dimension, over CUDA's limit of {limit}")
    return grid


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
