"""Convolution with its inference epilogue, `relu?(conv2d(x, weight) + bias (+ residual))` (square kernels,
one stride, padding and dilation for both axes): everything of the op that lives in Python.

- `conv2d_epilogue`: the public function. It picks a backend: the Triton kernel wherever Triton runs (a
  GPU, or the interpreter), else the reference. There is no C++ kernel: the library's own convolutions
  (cuDNN, oneDNN) are the alternative, and an inference plan chooses between them per layer by measurement.
- `check_conv2d_epilogue_args`: the checks, raising ValueError naming the argument. The Triton op, its fake
  kernel and the reference path run them.
- `icnet::conv2d_epilogue_triton`: the Triton op (the kernel is in icnet_kernels/triton/conv2d_epilogue.py),
  its fake kernel. split_k splits the reduction across that many programs per output tile, for maps too
  small to give every multiprocessor a tile; it changes the order of the float32 sums, not the result's
  meaning.
- Inference only: the backward raises an error that says so (train through ATen's convolution).
"""

import torch

from icnet_kernels import reference
from icnet_kernels.backends import choose_triton_or_reference
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.arguments import exact_int, require, require_feature_map, tensor_argument
from icnet_kernels.ops.inference_only import register_inference_only

MAX_KERNEL = 7  # the reduction's taps come from a compile-time window size
MAX_SPLIT_K = 64  # the partial sums are added in an unrolled loop


def conv_output_size(height: int, width: int, kernel: int, stride: int, padding: int, dilation: int):
    """The convolution's output size, as F.conv2d computes it."""
    span = dilation * (kernel - 1) + 1
    return (height + 2 * padding - span) // stride + 1, (width + 2 * padding - span) // stride + 1


def check_conv2d_epilogue_args(x, weight, bias, residual, stride: int, padding: int, dilation: int, split_k: int,
                               kernel: bool = True) -> None:
    """Raises ValueError naming the argument. kernel: the Triton kernel's dtypes only (float64 is the
    reference's alone)."""
    op = "conv2d_epilogue"
    require_feature_map(op, "x", x, "N, Ci, H, W", kernel)
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        require(t.dtype == x.dtype, f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        require(t.device == x.device, f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    n, ci, h, w = x.shape
    require(ci > 0, f"{op}: x needs at least one channel")
    require(weight.dim() == 4 and weight.shape[1] == ci and weight.shape[2] == weight.shape[3],
            f"{op}: weight must be [Co, {ci}, k, k] (Ci = x's channels, a square kernel), got {list(weight.shape)}")
    co, k = weight.shape[0], weight.shape[2]
    require(co > 0, f"{op}: weight must have at least one output channel")
    require(1 <= k <= MAX_KERNEL, f"{op}: weight's kernel size must be in [1, {MAX_KERNEL}], got {k}")
    require(bias.dim() == 1 and bias.shape[0] == co, f"{op}: bias must be [{co}], got {list(bias.shape)}")
    require(stride >= 1, f"{op}: stride must be at least 1, got {stride}")
    require(dilation >= 1, f"{op}: dilation must be at least 1, got {dilation}")
    require(padding >= 0, f"{op}: padding must be at least 0, got {padding}")
    require(1 <= split_k <= MAX_SPLIT_K, f"{op}: split_k must be in [1, {MAX_SPLIT_K}], got {split_k}")
    oh, ow = conv_output_size(h, w, k, stride, padding, dilation)
    require(oh >= 1 and ow >= 1, f"{op}: x's {h}x{w} map is smaller than the {k}x{k} window (dilation "
            f"{dilation}, padding {padding})")
    if residual is not None:
        require(tuple(residual.shape) == (n, co, oh, ow),
                f"{op}: residual must be the output's shape {[n, co, oh, ow]}, got {list(residual.shape)}")


def conv2d_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                    stride: int = 1, padding: int = 0, dilation: int = 1, relu: bool = False, split_k: int = 1,
                    backend: str | None = None) -> torch.Tensor:
    """relu?(conv2d(x, weight, bias, stride, padding, dilation) (+ residual)) in x's dtype and memory format.
    weight [Co, Ci, k, k], bias [Co], residual (optional) the output's shape. backend: None (Triton where it
    runs, else the reference), "triton" or "reference"."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        tensor_argument(name, t)
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise ValueError(f"residual must be a tensor or None, got {type(residual).__name__}")
    if not isinstance(relu, bool):
        raise ValueError(f"relu must be a bool, got {relu!r}")
    stride, padding, dilation, split_k = (exact_int(name, v) for name, v in (
        ("stride", stride), ("padding", padding), ("dilation", dilation), ("split_k", split_k)))
    backend = choose_triton_or_reference(backend, x, "conv2d_epilogue")
    if backend == "reference":
        check_conv2d_epilogue_args(x, weight, bias, residual, stride, padding, dilation, split_k, kernel=False)
        return reference.conv2d_epilogue_reference(x, weight, bias, residual, stride, padding, dilation, relu)
    return torch.ops.icnet.conv2d_epilogue_triton(x, weight, bias, residual, stride, padding, dilation, relu, split_k)


@torch.library.custom_op("icnet::conv2d_epilogue_triton", mutates_args=())
def conv2d_epilogue_triton_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              residual: torch.Tensor | None, stride: int, padding: int, dilation: int, relu: bool,
                              split_k: int) -> torch.Tensor:
    from icnet_kernels.triton.conv2d_epilogue import conv2d_epilogue_triton
    check_conv2d_epilogue_args(x, weight, bias, residual, stride, padding, dilation, split_k)
    size = conv_output_size(*x.shape[2:], weight.shape[2], stride, padding, dilation)
    return conv2d_epilogue_triton(x, weight, bias, residual, stride, padding, dilation, relu, split_k, size)


def conv2d_epilogue_fake(x, weight, bias, residual, stride, padding, dilation, relu, split_k):
    """Shape, dtype and layout of the output, after the same checks as the kernel."""
    check_conv2d_epilogue_args(x, weight, bias, residual, stride, padding, dilation, split_k)
    size = conv_output_size(*x.shape[2:], weight.shape[2], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


register_inference_only("conv2d_epilogue_triton", conv2d_epilogue_fake, "conv2d_epilogue")
