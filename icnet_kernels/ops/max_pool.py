"""Max pooling without indices, `max_pool2d(x, kernel_size, stride, padding)` (square windows, floor mode):
everything of the op that lives in Python.

- `max_pool`: the public function. It picks a backend: the Triton kernel wherever Triton runs (a GPU, or
  the interpreter), else the reference. There is no C++ kernel (ATen's CPU max pooling already writes no
  indices).
- `check_max_pool_args`: the checks, raising ValueError naming the argument. The Triton op, its fake
  kernel and the reference path run them.
- `icnet::max_pool_triton`: the Triton op (the kernel is in icnet_kernels/triton/max_pool.py) and its fake
  kernel.
- Inference only: without indices there is nothing to route a gradient by, so the backward raises an error
  that says so (train through max_pool_reference, which is ATen's).
"""

import torch

from icnet_kernels import reference
from icnet_kernels.backends import choose_triton_or_reference
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.arguments import exact_int, require, require_feature_map
from icnet_kernels.ops.inference_only import register_inference_only

MAX_KERNEL = 16  # the kernel unrolls the window's taps


def pooled_size(height: int, width: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    """The output's spatial size in floor mode."""
    return (height + 2 * padding - kernel_size) // stride + 1, (width + 2 * padding - kernel_size) // stride + 1


def check_max_pool_args(x, kernel_size: int, stride: int, padding: int, kernel: bool = True) -> None:
    """Raises ValueError naming the argument. kernel: the Triton kernel's dtypes only (float64 is the
    reference's alone)."""
    op = "max_pool"
    require_feature_map(op, "x", x, "N, C, H, W", kernel)
    require(1 <= kernel_size <= MAX_KERNEL, f"{op}: kernel_size must be in [1, {MAX_KERNEL}], got {kernel_size}")
    require(stride >= 1, f"{op}: stride must be at least 1, got {stride}")
    require(0 <= padding <= kernel_size // 2,
            f"{op}: padding must be in [0, kernel_size // 2 = {kernel_size // 2}], got {padding}")
    h, w = x.shape[2], x.shape[3]
    require(x.shape[1] > 0, f"{op}: x needs at least one channel")
    require(h + 2 * padding >= kernel_size and w + 2 * padding >= kernel_size,
            f"{op}: x's {h}x{w} map with padding {padding} is smaller than the {kernel_size}x{kernel_size} window")


def max_pool(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1,
             backend: str | None = None) -> torch.Tensor:
    """F.max_pool2d(x, kernel_size, stride, padding) (floor mode, no dilation), the values only, in x's dtype
    and memory format; NaN propagates as in ATen. The defaults are ICNet's pool1. backend: None (Triton
    where it runs, else the reference), "triton" or "reference"."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {type(x).__name__}")
    kernel_size, stride, padding = (exact_int(name, v) for name, v in
                                    (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)))
    backend = choose_triton_or_reference(backend, x, "max_pool")
    if backend == "reference":
        check_max_pool_args(x, kernel_size, stride, padding, kernel=False)
        return reference.max_pool_reference(x, kernel_size, stride, padding)
    return torch.ops.icnet.max_pool_triton(x, kernel_size, stride, padding)


@torch.library.custom_op("icnet::max_pool_triton", mutates_args=())
def max_pool_triton_op(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    from icnet_kernels.triton.max_pool import max_pool_triton
    check_max_pool_args(x, kernel_size, stride, padding)
    return max_pool_triton(x, kernel_size, stride, padding)


def max_pool_fake(x, kernel_size, stride, padding):
    """Shape, dtype and layout of the output, after the same checks as the kernel."""
    check_max_pool_args(x, kernel_size, stride, padding)
    n, c, h, w = x.shape
    return torch.empty((n, c, *pooled_size(h, w, kernel_size, stride, padding)), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


register_inference_only("max_pool_triton", max_pool_fake, "max_pool")
