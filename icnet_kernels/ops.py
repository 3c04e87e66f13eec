"""Public functions of icnet_kernels: argument checks, backend choice, fake kernels and autograd."""

from collections.abc import Sequence

import torch

from icnet_kernels import reference
from icnet_kernels._native import native_available
from icnet_kernels.backends import choose_backend

Pair = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------------
# summed pyramid pooling

def _pairs(name: str, values, count: int) -> tuple[Pair, ...]:
    """Normalises kernel_sizes/strides: one int or (h, w) pair per bin."""
    if len(values) != count:
        raise ValueError(f"{name} must hold one entry per bin ({count}), got {len(values)}")
    pairs = []
    for v in values:
        pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(e) for e in v)
        if len(pair) != 2:
            raise ValueError(f"{name} entries must be an int or an (h, w) pair, got {v!r}")
        pairs.append(pair)
    return tuple(pairs)


def _pyramid_geometry(x: torch.Tensor, bins, kernel_sizes, strides):
    """Checks the arguments of pyramid_pool_sum; returns bins, kernel pairs and stride pairs as tuples."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    height, width = x.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(f"x must have a non-empty spatial size, got {height}x{width}")
    bins = tuple(int(b) for b in bins)
    if not bins:
        raise ValueError("bins must name at least one bin")
    for i, b in enumerate(bins):
        if b < 1 or b > min(height, width):
            raise ValueError(f"bins[{i}] = {b} must be in [1, min(H, W)] for the {height}x{width} map")
    if (kernel_sizes is None) != (strides is None):
        raise ValueError("kernel_sizes and strides must both be given (explicit pooling) or both be None (adaptive)")
    if kernel_sizes is None:
        return bins, None, None
    kernels = _pairs("kernel_sizes", kernel_sizes, len(bins))
    steps = _pairs("strides", strides, len(bins))
    for i, (b, k, s) in enumerate(zip(bins, kernels, steps)):
        for axis, length in enumerate((height, width)):
            if not 1 <= k[axis] <= length:
                raise ValueError(f"kernel_sizes[{i}] = {k} does not fit the {height}x{width} map")
            if s[axis] < 1:
                raise ValueError(f"strides[{i}] = {s} must be positive")
            if (length - k[axis]) // s[axis] + 1 != b:
                raise ValueError(
                    f"bin {b} with kernel_sizes[{i}] = {k} and strides[{i}] = {s} gives "
                    f"{(length - k[axis]) // s[axis] + 1} pooled positions along a side of {length}; they must agree")
    return bins, kernels, steps


def _flat(pairs) -> list[int]:
    return [] if pairs is None else [v for pair in pairs for v in pair]


def _unflat(values) -> tuple[Pair, ...] | None:
    return None if not values else tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))


def pyramid_pool_sum(x: torch.Tensor, bins: Sequence[int] = (1, 2, 3, 6),
                     kernel_sizes: Sequence[int | Pair] | None = None, strides: Sequence[int | Pair] | None = None,
                     align_corners: bool = True, backend: str | None = None) -> torch.Tensor:
    """Summed pyramid pooling: x + sum over bins of bilinear_resize(avg_pool_bin(x), x's size).

    bins: pooled grid side of each level. kernel_sizes/strides: None for PyTorch's adaptive pooling, or one
    int or (h, w) pair per bin (the released ICNet uses explicit values for its 33x65 map). The output has
    x's dtype and memory format. backend: None (best available), "native", "triton" or "reference".
    """
    bins, kernels, steps = _pyramid_geometry(x, bins, kernel_sizes, strides)
    backend = choose_backend(backend, x)
    if backend == "reference":
        return reference.pyramid_pool_sum_reference(x, bins, kernels, steps, align_corners)
    op = torch.ops.icnet.pyramid_pool_sum if backend == "native" else torch.ops.icnet.pyramid_pool_sum_triton
    return op(x, list(bins), _flat(kernels), _flat(steps), align_corners)


def _pyramid_fake(x, bins, kernel_sizes, strides, align_corners):
    torch._check(x.dim() == 4, lambda: f"x must be a 4-D tensor, got {x.dim()} dimensions")
    return torch.empty_like(x)


def _pyramid_setup_context(ctx, inputs, output):
    _, ctx.bins, ctx.kernel_sizes, ctx.strides, ctx.align_corners = inputs


def _pyramid_autograd(forward_op, adjoint_op):
    """The op is linear: its backward is its adjoint, and the adjoint's backward is the op itself."""
    def backward(ctx, grad):
        return adjoint_op(grad, ctx.bins, ctx.kernel_sizes, ctx.strides, ctx.align_corners), None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_pyramid_setup_context)


@torch.library.custom_op("icnet::pyramid_pool_sum_triton", mutates_args=())
def _pyramid_pool_sum_triton(x: torch.Tensor, bins: list[int], kernel_sizes: list[int], strides: list[int],
                             align_corners: bool) -> torch.Tensor:
    from icnet_kernels.triton.pyramid_pool_sum import pyramid_pool_sum_triton
    return pyramid_pool_sum_triton(x, bins, _unflat(kernel_sizes), _unflat(strides), align_corners)


@torch.library.custom_op("icnet::pyramid_pool_sum_backward_triton", mutates_args=())
def _pyramid_pool_sum_backward_triton(grad_out: torch.Tensor, bins: list[int], kernel_sizes: list[int],
                                      strides: list[int], align_corners: bool) -> torch.Tensor:
    from icnet_kernels.triton.pyramid_pool_sum import pyramid_pool_sum_triton
    return pyramid_pool_sum_triton(grad_out, bins, _unflat(kernel_sizes), _unflat(strides), align_corners,
                                   adjoint=True)


def _register_pyramid_ops():
    pairs = [("icnet::pyramid_pool_sum_triton", "icnet::pyramid_pool_sum_backward_triton")]
    if native_available():
        pairs.append(("icnet::pyramid_pool_sum", "icnet::pyramid_pool_sum_backward"))
    for forward_name, adjoint_name in pairs:
        forward_op = getattr(torch.ops.icnet, forward_name.split("::")[1]).default
        adjoint_op = getattr(torch.ops.icnet, adjoint_name.split("::")[1]).default
        for name in (forward_name, adjoint_name):
            torch.library.register_fake(name)(_pyramid_fake)
        _pyramid_autograd(forward_op, adjoint_op)
        _pyramid_autograd(adjoint_op, forward_op)


_register_pyramid_ops()
