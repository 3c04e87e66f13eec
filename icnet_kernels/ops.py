"""Public functions of icnet_kernels: argument checks, backend choice, fake kernels and autograd."""

from collections.abc import Sequence

import torch

from icnet_kernels import reference
from icnet_kernels._native import native_available
from icnet_kernels.backends import choose_backend
from icnet_kernels.cff_geometry import output_memory_format

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


def _unflat_checked(values, name: str, bins: int) -> tuple[Pair, ...] | None:
    """The schema's flat [h0, w0, h1, w1, ...] list back into pairs, checking its length."""
    if not values:
        return None
    if len(values) != 2 * bins:
        raise ValueError(f"{name} must hold one (h, w) pair per bin ({2 * bins} numbers), got {len(values)}")
    return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))


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


def _pyramid_triton(x, bins, kernel_sizes, strides, align_corners, adjoint):
    """The Triton ops' shared body: the schema's flat lists back into checked pairs, then the kernel."""
    from icnet_kernels.triton.pyramid_pool_sum import pyramid_pool_sum_triton
    bins, kernels, steps = _pyramid_geometry(x, bins, _unflat_checked(kernel_sizes, "kernel_sizes", len(bins)),
                                             _unflat_checked(strides, "strides", len(bins)))
    return pyramid_pool_sum_triton(x, bins, kernels, steps, align_corners, adjoint=adjoint)


@torch.library.custom_op("icnet::pyramid_pool_sum_triton", mutates_args=())
def _pyramid_pool_sum_triton(x: torch.Tensor, bins: list[int], kernel_sizes: list[int], strides: list[int],
                             align_corners: bool) -> torch.Tensor:
    return _pyramid_triton(x, bins, kernel_sizes, strides, align_corners, adjoint=False)


@torch.library.custom_op("icnet::pyramid_pool_sum_backward_triton", mutates_args=())
def _pyramid_pool_sum_backward_triton(grad_out: torch.Tensor, bins: list[int], kernel_sizes: list[int],
                                      strides: list[int], align_corners: bool) -> torch.Tensor:
    return _pyramid_triton(grad_out, bins, kernel_sizes, strides, align_corners, adjoint=True)


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


# ---------------------------------------------------------------------------------------------------------------
# cascade feature fusion

def _check_cff(low, high, weight_low, weight_high, dilation):
    for name, t in (("low", low), ("high", high)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [N, C, H, W], got {getattr(t, 'shape', type(t))}")
    if not low.is_floating_point():
        raise ValueError(f"low must be a floating-point tensor, got {low.dtype}")
    if high.dtype != low.dtype or high.device != low.device:
        raise ValueError(f"high must match low's dtype and device ({low.dtype}, {low.device}), "
                         f"got {high.dtype} on {high.device}")
    if high.shape[0] != low.shape[0]:
        raise ValueError(f"high's batch {high.shape[0]} must equal low's {low.shape[0]}")
    if min(low.shape[1:]) < 1 or high.shape[1] < 1:
        raise ValueError(f"low and high need channels and a non-empty map, got {tuple(low.shape)} and {tuple(high.shape)}")
    if high.shape[2] < low.shape[2] or high.shape[3] < low.shape[3]:
        raise ValueError(f"high ({high.shape[2]}x{high.shape[3]}) must be at least as large as low "
                         f"({low.shape[2]}x{low.shape[3]})")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    if weight_low.dim() != 4 or tuple(weight_low.shape[1:]) != (low.shape[1], 3, 3):
        raise ValueError(f"weight_low must be [Co, {low.shape[1]}, 3, 3] (Cl = low's channels), "
                         f"got {tuple(weight_low.shape)}")
    co = weight_low.shape[0]
    if weight_high.dim() not in (2, 4) or weight_high.shape[0] != co or weight_high.shape[1] != high.shape[1] or (
            weight_high.dim() == 4 and tuple(weight_high.shape[2:]) != (1, 1)):
        raise ValueError(f"weight_high must be [{co}, {high.shape[1]}] or [{co}, {high.shape[1]}, 1, 1] "
                         f"(Co of weight_low, Ch = high's channels), got {tuple(weight_high.shape)}")
    for name, t in (("weight_low", weight_low), ("weight_high", weight_high)):
        if t.dtype != low.dtype or t.device != low.device:
            raise ValueError(f"{name} must match low's dtype and device ({low.dtype}, {low.device}), "
                             f"got {t.dtype} on {t.device}")
    return co


def _per_channel(name, value, co, like, default):
    if value is None:
        return torch.full((co,), default, dtype=like.dtype, device=like.device)
    if value.shape != (co,):
        raise ValueError(f"{name} must be [{co}] (one value per output channel), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {value.device}")
    return value.to(like.dtype)


def cascade_feature_fusion(low: torch.Tensor, high: torch.Tensor, weight_low: torch.Tensor,
                           weight_high: torch.Tensor, scale_low: torch.Tensor | None = None,
                           shift_low: torch.Tensor | None = None, scale_high: torch.Tensor | None = None,
                           shift_high: torch.Tensor | None = None, dilation: int = 2, align_corners: bool = True,
                           return_upsampled: bool = False, backend: str | None = None):
    """ICNet's cascade feature fusion as one fused op:

        relu((conv3x3(resize(low, high's size), weight_low, dilation) * scale_low + shift_low)
             + (conv1x1(high, weight_high) * scale_high + shift_high))

    scale/shift: per output channel (inference BatchNorm; None for 1 and 0). The scales are folded into the
    weights and the shifts into one bias before the kernel runs, so gradients reach all eight inputs.
    With return_upsampled, also returns resize(low), which ICNet's training-time classifier needs.
    """
    co = _check_cff(low, high, weight_low, weight_high, dilation)
    scale_low = _per_channel("scale_low", scale_low, co, low, 1.0)
    shift_low = _per_channel("shift_low", shift_low, co, low, 0.0)
    scale_high = _per_channel("scale_high", scale_high, co, low, 1.0)
    shift_high = _per_channel("shift_high", shift_high, co, low, 0.0)
    backend = choose_backend(backend, low)
    if backend == "reference":
        out = reference.cascade_feature_fusion_reference(low, high, weight_low, scale_low, shift_low, weight_high,
                                                         scale_high, shift_high, dilation, align_corners)
    else:
        op = (torch.ops.icnet.cascade_feature_fusion if backend == "native"
              else torch.ops.icnet.cascade_feature_fusion_triton)
        folded_low = weight_low * scale_low[:, None, None, None]
        folded_high = weight_high.reshape(co, -1) * scale_high[:, None]
        out = op(low, high, folded_low, folded_high, shift_low + shift_high, dilation, align_corners)
    if not return_upsampled:
        return out
    return out, torch.nn.functional.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=align_corners)


@torch.library.custom_op("icnet::cascade_feature_fusion_triton", mutates_args=())
def _cascade_feature_fusion_triton(low: torch.Tensor, high: torch.Tensor, weight_low: torch.Tensor,
                                   weight_high: torch.Tensor, bias: torch.Tensor, dilation: int,
                                   align_corners: bool) -> torch.Tensor:
    from icnet_kernels.triton.cascade_feature_fusion import cascade_feature_fusion_triton
    co = _check_cff(low, high, weight_low, weight_high, dilation)
    if weight_high.dim() != 2:
        raise ValueError(f"weight_high must be [{co}, {high.shape[1]}] (folded, 2-D), got {tuple(weight_high.shape)}")
    if bias.shape != (co,) or bias.dtype != low.dtype or bias.device != low.device:
        raise ValueError(f"bias must be [{co}] with low's dtype and device, got {tuple(bias.shape)} {bias.dtype} "
                         f"on {bias.device}")
    return cascade_feature_fusion_triton(low, high, weight_low, weight_high, bias, dilation, align_corners)


def _cff_fake(low, high, weight_low, weight_high, bias, dilation, align_corners):
    torch._check(low.dim() == 4 and high.dim() == 4, lambda: "low and high must be 4-D")
    return torch.empty((high.shape[0], weight_low.shape[0], high.shape[2], high.shape[3]), dtype=high.dtype,
                       device=high.device, memory_format=output_memory_format(high))


def _cff_setup_context(ctx, inputs, output):
    low, high, weight_low, weight_high, bias, dilation, align_corners = inputs
    ctx.save_for_backward(low, high, weight_low, weight_high, output)
    ctx.dilation, ctx.align_corners = dilation, align_corners


def _cff_backward(ctx, grad):
    """Composed from ATen ops on the inputs' device (a fused backward kernel is future work)."""
    low, high, weight_low, weight_high, out = ctx.saved_tensors
    d = ctx.dilation
    grad = grad * (out > 0)
    # The resize's own autograd gives low's gradient: calling upsample_bilinear2d_backward directly fails
    # under dynamic shapes (torch.compile, opcheck) in current torch releases.
    with torch.enable_grad():
        low_leaf = low.detach().requires_grad_(ctx.needs_input_grad[0])
        up = torch.nn.functional.interpolate(low_leaf, size=high.shape[-2:], mode="bilinear",
                                             align_corners=ctx.align_corners)
    grad_up, grad_weight_low, _ = torch.ops.aten.convolution_backward(
        grad, up.detach(), weight_low, None, [1, 1], [d, d], [d, d], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[2], False])
    grad_high, grad_weight_high, _ = torch.ops.aten.convolution_backward(
        grad, high, weight_high[:, :, None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[1], ctx.needs_input_grad[3], False])
    grad_low = torch.autograd.grad(up, low_leaf, grad_up)[0] if ctx.needs_input_grad[0] else None
    grad_weight_high = None if grad_weight_high is None else grad_weight_high.reshape(weight_high.shape)
    grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[4] else None
    return grad_low, grad_high, grad_weight_low, grad_weight_high, grad_bias, None, None


def _register_cff_ops():
    names = ["icnet::cascade_feature_fusion_triton"]
    if native_available():
        names.append("icnet::cascade_feature_fusion")
    for name in names:
        torch.library.register_fake(name)(_cff_fake)
        torch.library.register_autograd(name, _cff_backward, setup_context=_cff_setup_context)


_register_cff_ops()
