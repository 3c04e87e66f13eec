"""Summed pyramid pooling, `out = x + sum_b bilinear_resize(avg_pool_b(x), x's size)`: everything of the op
that lives in Python.

- `pyramid_pool_sum`: the public function. It turns its Python-friendly arguments (pairs, None) into the
  schema's flat lists and picks a backend; the backend's op checks them.
- `check_pyramid_pool_sum_args`: the checks of csrc/common/pyramid_args.cpp in Python, with the same
  messages. The Triton ops, the fake kernels and the reference path run them; the C++ and CUDA kernels
  run their own.
- `icnet::pyramid_pool_sum_triton` and `icnet::pyramid_pool_sum_backward_triton`: the Triton ops (the
  kernel is in icnet_kernels/triton/pyramid_pool_sum.py). Their schemas equal the C++ ops'
  (csrc/registration.cpp); tests/test_op_schemas.py holds them equal.
- The fake kernels and the autograd of all four ops: the op is linear, so its backward is its adjoint.
"""

from collections.abc import Sequence

import torch

from icnet_kernels import reference
from icnet_kernels._native import native_available
from icnet_kernels.backends import choose_backend
from icnet_kernels.ops.arguments import exact_int, require

Pair = tuple[int, int]
MAX_BINS = 8  # kMaxBins of csrc/common/pyramid_geometry.h: the kernels keep their tables in fixed arrays
INT32_MAX = 2**31 - 1


def check_pyramid_pool_sum_args(x: torch.Tensor, bins: Sequence[int], kernel_sizes: Sequence[int],
                                strides: Sequence[int], op: str = "pyramid_pool_sum") -> None:
    """Raises ValueError naming the argument, exactly where make_pyramid_geometry (C++) does."""
    require(x.dim() == 4, f"{op}: x must be a 4-D tensor [N, C, H, W], got {x.dim()} dimensions")
    require(x.is_floating_point(), f"{op}: x must be a floating-point tensor, got {x.dtype}")
    height, width = x.shape[2], x.shape[3]
    require(height > 0 and width > 0, f"{op}: x must have a non-empty spatial size, got {height}x{width}")
    require(len(bins) > 0, f"{op}: bins must name at least one bin")
    require(len(bins) <= MAX_BINS, f"{op}: bins may have at most {MAX_BINS} entries, got {len(bins)}")
    require(height * width <= INT32_MAX, f"{op}: x's spatial size {height}x{width} is too large")
    adaptive = len(kernel_sizes) == 0
    require(adaptive == (len(strides) == 0),
            f"{op}: kernel_sizes and strides must both be given (explicit pooling) or both be empty (adaptive)")
    if not adaptive:
        require(len(kernel_sizes) == 2 * len(bins), f"{op}: kernel_sizes must hold one (kh, kw) pair per bin "
                f"({2 * len(bins)} numbers), got {len(kernel_sizes)}")
        require(len(strides) == 2 * len(bins), f"{op}: strides must hold one (sh, sw) pair per bin "
                f"({2 * len(bins)} numbers), got {len(strides)}")
    for b, n in enumerate(bins):
        require(n >= 1, f"{op}: bins[{b}] must be at least 1, got {n}")
        require(n <= height and n <= width, f"{op}: bins[{b}] = {n} is larger than the {height}x{width} map")
        if adaptive:
            continue
        for axis, length in enumerate((height, width)):
            k, s = kernel_sizes[2 * b + axis], strides[2 * b + axis]
            require(1 <= k <= length, f"{op}: kernel_sizes[{2 * b + axis}] = {k} must be in [1, {length}]")
            require(s >= 1, f"{op}: strides[{2 * b + axis}] = {s} must be at least 1")
            require((length - k) // s + 1 == n, f"{op}: bin {n} with kernel {k} and stride {s} gives "
                    f"{(length - k) // s + 1} pooled positions along a side of {length}; they must agree")


def _flat_pairs(name: str, values, count: int) -> list[int]:
    """kernel_sizes/strides as the public function takes them (one int or (h, w) pair per bin), flattened."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence with one int or (h, w) pair per bin, got {values!r}")
    if len(values) != count:
        raise ValueError(f"{name} must hold one entry per bin ({count}), got {len(values)}")
    flat = []
    for i, v in enumerate(values):
        pair = (v, v) if not isinstance(v, Sequence) else tuple(v)
        if len(pair) != 2:
            raise ValueError(f"{name}[{i}] must be an int or an (h, w) pair, got {v!r}")
        flat += [exact_int(f"{name}[{i}]", e) for e in pair]
    return flat


def _pairs_of(flat: Sequence[int]) -> tuple[Pair, ...] | None:
    return None if not flat else tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def pyramid_pool_sum(x: torch.Tensor, bins: Sequence[int] = (1, 2, 3, 6),
                     kernel_sizes: Sequence[int | Pair] | None = None, strides: Sequence[int | Pair] | None = None,
                     align_corners: bool = True, backend: str | None = None) -> torch.Tensor:
    """Summed pyramid pooling: x + sum over bins of bilinear_resize(avg_pool_bin(x), x's size).

    bins: pooled grid side of each level. kernel_sizes/strides: None for PyTorch's adaptive pooling, or one
    int or (h, w) pair per bin (the released ICNet uses explicit values for its 33x65 map). The output has
    x's dtype and memory format. backend: None (best available), "native", "triton" or "reference".
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {type(x).__name__}")
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence):
        raise ValueError(f"bins must be a sequence of ints, got {bins!r}")
    bins = [exact_int(f"bins[{i}]", b) for i, b in enumerate(bins)]
    if (kernel_sizes is None) != (strides is None):
        raise ValueError("kernel_sizes and strides must both be given (explicit pooling) or both be None (adaptive)")
    flat_kernels = [] if kernel_sizes is None else _flat_pairs("kernel_sizes", kernel_sizes, len(bins))
    flat_strides = [] if strides is None else _flat_pairs("strides", strides, len(bins))
    if not isinstance(align_corners, bool):
        raise ValueError(f"align_corners must be a bool, got {align_corners!r}")
    backend = choose_backend(backend, x)
    if backend == "reference":
        check_pyramid_pool_sum_args(x, bins, flat_kernels, flat_strides)
        return reference.pyramid_pool_sum_reference(x, bins, _pairs_of(flat_kernels), _pairs_of(flat_strides),
                                                    align_corners)
    op = torch.ops.icnet.pyramid_pool_sum if backend == "native" else torch.ops.icnet.pyramid_pool_sum_triton
    return op(x, bins, flat_kernels, flat_strides, align_corners)


def _run_triton(x, bins, kernel_sizes, strides, align_corners, adjoint: bool, op: str):
    from icnet_kernels.triton.pyramid_pool_sum import pyramid_pool_sum_triton
    check_pyramid_pool_sum_args(x, bins, kernel_sizes, strides, op)
    return pyramid_pool_sum_triton(x, tuple(bins), _pairs_of(kernel_sizes), _pairs_of(strides), align_corners,
                                   adjoint=adjoint)


@torch.library.custom_op("icnet::pyramid_pool_sum_triton", mutates_args=())
def pyramid_pool_sum_triton_op(x: torch.Tensor, bins: list[int], kernel_sizes: list[int], strides: list[int],
                               align_corners: bool) -> torch.Tensor:
    return _run_triton(x, bins, kernel_sizes, strides, align_corners, False, "pyramid_pool_sum")


@torch.library.custom_op("icnet::pyramid_pool_sum_backward_triton", mutates_args=())
def pyramid_pool_sum_backward_triton_op(grad_out: torch.Tensor, bins: list[int], kernel_sizes: list[int],
                                        strides: list[int], align_corners: bool) -> torch.Tensor:
    return _run_triton(grad_out, bins, kernel_sizes, strides, align_corners, True, "pyramid_pool_sum_backward")


def pyramid_pool_sum_fake(x, bins, kernel_sizes, strides, align_corners):
    """Shape, dtype and layout of the output, after the same checks as the kernels."""
    check_pyramid_pool_sum_args(x, bins, kernel_sizes, strides)
    return torch.empty_like(x)


def pyramid_pool_sum_backward_fake(grad_out, bins, kernel_sizes, strides, align_corners):
    check_pyramid_pool_sum_args(grad_out, bins, kernel_sizes, strides, "pyramid_pool_sum_backward")
    return torch.empty_like(grad_out)


def pyramid_pool_sum_setup_context(ctx, inputs, output):
    _, ctx.bins, ctx.kernel_sizes, ctx.strides, ctx.align_corners = inputs


def _register_autograd(forward_op, adjoint_op):
    """The backward of a linear op is its adjoint, and the adjoint's backward is the op itself."""
    def backward(ctx, grad):
        return adjoint_op(grad, ctx.bins, ctx.kernel_sizes, ctx.strides, ctx.align_corners), None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=pyramid_pool_sum_setup_context)


def _register():
    pairs = [(torch.ops.icnet.pyramid_pool_sum_triton.default, torch.ops.icnet.pyramid_pool_sum_backward_triton.default)]
    if native_available():
        pairs.append((torch.ops.icnet.pyramid_pool_sum.default, torch.ops.icnet.pyramid_pool_sum_backward.default))
    for forward_op, adjoint_op in pairs:
        torch.library.register_fake(forward_op)(pyramid_pool_sum_fake)
        torch.library.register_fake(adjoint_op)(pyramid_pool_sum_backward_fake)
        _register_autograd(forward_op, adjoint_op)
        _register_autograd(adjoint_op, forward_op)


_register()
