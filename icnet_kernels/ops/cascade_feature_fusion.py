"""Cascade feature fusion, `relu(BN_low(conv3x3_dil(resize(low))) + BN_high(conv1x1(high)))`: everything of
the op that lives in Python.

- `cascade_feature_fusion`: the public function. It checks its own arguments (the BatchNorm scales and
  shifts, which the op does not take), folds them into the weights and one bias in float32, and picks a
  backend; the backend's op checks the rest.
- `check_cascade_feature_fusion_args`: the checks of csrc/common/cff_args.cpp in Python, with the same
  messages. The Triton op, the fake kernel and the reference path run them; the C++ and CUDA kernels run
  their own.
- `icnet::cascade_feature_fusion_triton`: the Triton op (the kernel is in
  icnet_kernels/triton/cascade_feature_fusion.py); its schema equals the C++ op's (csrc/registration.cpp),
  and tests/test_op_schemas.py holds them equal.
- The fake kernel and the autograd of both ops.
"""

import torch
import torch.nn.functional as F

from icnet_kernels import reference
from icnet_kernels._native import native_available
from icnet_kernels.backends import choose_backend
from icnet_kernels.cff_geometry import output_memory_format
from icnet_kernels.ops.arguments import exact_int, require, tensor_argument

INT32_MAX = 2**31 - 1


def check_cascade_feature_fusion_args(low, high, weight_low, weight_high, bias, dilation: int,
                                      align_corners: bool) -> None:
    """Raises ValueError naming the argument, exactly where make_cff_shape (C++) does."""
    op = "cascade_feature_fusion"
    require(low.dim() == 4, f"{op}: low must be a 4-D tensor [N, Cl, h, w], got {low.dim()} dimensions")
    require(high.dim() == 4, f"{op}: high must be a 4-D tensor [N, Ch, H, W], got {high.dim()} dimensions")
    require(low.is_floating_point(), f"{op}: low must be floating point, got {low.dtype}")
    for name, t in (("high", high), ("weight_low", weight_low), ("weight_high", weight_high), ("bias", bias)):
        require(t.dtype == low.dtype, f"{op}: {name} must have low's dtype {low.dtype}, got {t.dtype}")
        require(t.device == low.device, f"{op}: {name} must be on low's device {low.device}, got {t.device}")
    n, cl, h, w = low.shape
    _, ch, height, width = high.shape
    require(high.shape[0] == n, f"{op}: high's batch {high.shape[0]} must equal low's {n}")
    require(cl > 0 and ch > 0, f"{op}: low and high need at least one channel, got {cl} and {ch}")
    require(h > 0 and w > 0, f"{op}: low must have a non-empty spatial size, got {h}x{w}")
    require(height >= h and width >= w,
            f"{op}: high ({height}x{width}) must be at least as large as low ({h}x{w})")
    require(1 <= dilation <= INT32_MAX, f"{op}: dilation must be in [1, 2^31 - 1], got {dilation}")
    require(weight_low.dim() == 4 and tuple(weight_low.shape[1:]) == (cl, 3, 3),
            f"{op}: weight_low must be [Co, {cl}, 3, 3] (Cl = low's channels), got {list(weight_low.shape)}")
    co = weight_low.shape[0]
    require(co > 0, f"{op}: weight_low must have at least one output channel")
    require(weight_high.dim() == 2 and tuple(weight_high.shape) == (co, ch),
            f"{op}: weight_high must be [{co}, {ch}] (Co of weight_low, Ch = high's channels), "
            f"got {list(weight_high.shape)}")
    require(bias.dim() == 1 and bias.shape[0] == co, f"{op}: bias must be [{co}], got {list(bias.shape)}")


def _per_channel(name: str, value, co: int, like: torch.Tensor) -> torch.Tensor | None:
    """A BatchNorm scale or shift: None, or a real floating-point [Co] tensor on like's device."""
    if value is None:
        return None
    value = tensor_argument(name, value)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got {value.dtype}")
    if value.shape != (co,):
        raise ValueError(f"{name} must be [{co}] (one value per output channel), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {value.device}")
    return value


def _or_constant(value: torch.Tensor | None, constant: float, co: int, like: torch.Tensor) -> torch.Tensor:
    """A scale or shift in like's dtype, the constant on every channel where it is None (the reference's form)."""
    if value is None:
        return torch.full((co,), constant, dtype=like.dtype, device=like.device)
    return value.to(like.dtype)


def fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm folds run in float32 (float64 for float64 weights), whatever the weights are stored in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_scale(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """weight * scale per output channel (dim 0), computed in float32 and returned in weight's dtype. A weight
    whose dim 0 is not scale's length is returned as it is, for the op's check to reject by name."""
    if scale is None or weight.dim() == 0 or weight.shape[0] != scale.shape[0]:
        return weight
    dtype = fold_dtype(weight.dtype)
    return (weight.to(dtype) * scale.to(dtype).reshape((-1,) + (1,) * (weight.dim() - 1))).to(weight.dtype)


def fold_bias(co: int, shift_low, shift_high, like: torch.Tensor) -> torch.Tensor:
    """shift_low + shift_high in float32, in like's dtype; zeros where both are None."""
    dtype = fold_dtype(like.dtype)
    bias = torch.zeros(co, dtype=dtype, device=like.device)
    for shift in (shift_low, shift_high):
        if shift is not None:
            bias = bias + shift.to(dtype)
    return bias.to(like.dtype)


def flat_weight_high(weight_high: torch.Tensor) -> torch.Tensor:
    """[Co, Ch, 1, 1] (a Conv2d's weight) as the op's [Co, Ch]; any other shape goes to the op's check as is."""
    if weight_high.dim() == 4 and tuple(weight_high.shape[2:]) == (1, 1):
        return weight_high.flatten(1)
    return weight_high


def cascade_feature_fusion(low: torch.Tensor, high: torch.Tensor, weight_low: torch.Tensor,
                           weight_high: torch.Tensor, scale_low: torch.Tensor | None = None,
                           shift_low: torch.Tensor | None = None, scale_high: torch.Tensor | None = None,
                           shift_high: torch.Tensor | None = None, dilation: int = 2, align_corners: bool = True,
                           return_upsampled: bool = False, backend: str | None = None):
    """ICNet's cascade feature fusion as one fused op:

        relu((conv3x3(resize(low, high's size), weight_low, dilation) * scale_low + shift_low)
             + (conv1x1(high, weight_high) * scale_high + shift_high))

    scale/shift: per output channel (inference BatchNorm; None for 1 and 0). The scales are folded into the
    weights and the shifts into one bias (in float32) before the kernel runs, so gradients reach all eight
    inputs. With return_upsampled, also returns resize(low), which ICNet's training-time classifier needs.
    """
    for name, t in (("low", low), ("high", high), ("weight_low", weight_low), ("weight_high", weight_high)):
        tensor_argument(name, t)
    dilation = exact_int("dilation", dilation)
    for name, flag in (("align_corners", align_corners), ("return_upsampled", return_upsampled)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    co = weight_low.shape[0] if weight_low.dim() > 0 else 0
    scale_low, shift_low, scale_high, shift_high = (
        _per_channel(name, value, co, low) for name, value in
        (("scale_low", scale_low), ("shift_low", shift_low), ("scale_high", scale_high), ("shift_high", shift_high)))
    weight_high = flat_weight_high(weight_high)
    bias = fold_bias(co, shift_low, shift_high, low)
    backend = choose_backend(backend, low)
    if backend == "reference":
        # folding keeps the weights' shapes and dtypes, so the unfolded ones are checked as the op would be
        check_cascade_feature_fusion_args(low, high, weight_low, weight_high, bias, dilation, align_corners)
        out = reference.cascade_feature_fusion_reference(
            low, high, weight_low, _or_constant(scale_low, 1.0, co, low), _or_constant(shift_low, 0.0, co, low),
            weight_high, _or_constant(scale_high, 1.0, co, low), _or_constant(shift_high, 0.0, co, low), dilation,
            align_corners)
    else:
        out = cascade_feature_fusion_folded(low, high, fold_scale(weight_low, scale_low),
                                            fold_scale(weight_high, scale_high), bias, dilation, align_corners,
                                            backend)
    if not return_upsampled:
        return out
    return out, F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=align_corners)


def cascade_feature_fusion_folded(low, high, weight_low, weight_high, bias, dilation: int, align_corners: bool,
                                  backend: str | None = None) -> torch.Tensor:
    """The op on weights already folded (its own arguments: weight_high [Co, Ch], one bias), for callers that
    fold once and keep the result, as CascadeFeatureFusion does in inference."""
    backend = choose_backend(backend, low)
    if backend == "reference":
        check_cascade_feature_fusion_args(low, high, weight_low, weight_high, bias, dilation, align_corners)
        return cascade_feature_fusion_composed(low, high, weight_low, weight_high, bias, dilation, align_corners)
    op = torch.ops.icnet.cascade_feature_fusion if backend == "native" else torch.ops.icnet.cascade_feature_fusion_triton
    return op(low, high, weight_low, weight_high, bias, dilation, align_corners)


@torch.library.custom_op("icnet::cascade_feature_fusion_triton", mutates_args=())
def cascade_feature_fusion_triton_op(low: torch.Tensor, high: torch.Tensor, weight_low: torch.Tensor,
                                     weight_high: torch.Tensor, bias: torch.Tensor, dilation: int,
                                     align_corners: bool) -> torch.Tensor:
    from icnet_kernels.triton.cascade_feature_fusion import cascade_feature_fusion_triton
    check_cascade_feature_fusion_args(low, high, weight_low, weight_high, bias, dilation, align_corners)
    return cascade_feature_fusion_triton(low, high, weight_low, weight_high, bias, dilation, align_corners)


def cascade_feature_fusion_fake(low, high, weight_low, weight_high, bias, dilation, align_corners):
    """Shape, dtype and layout of the output, after the same checks as the kernels."""
    check_cascade_feature_fusion_args(low, high, weight_low, weight_high, bias, dilation, align_corners)
    return torch.empty((high.shape[0], weight_low.shape[0], high.shape[2], high.shape[3]), dtype=high.dtype,
                       device=high.device, memory_format=output_memory_format(high))


def cascade_feature_fusion_setup_context(ctx, inputs, output):
    low, high, weight_low, weight_high, bias, dilation, align_corners = inputs
    ctx.save_for_backward(low, high, weight_low, weight_high, bias, output)
    ctx.dilation, ctx.align_corners = dilation, align_corners


def cascade_feature_fusion_composed(low, high, weight_low, weight_high, bias, dilation, align_corners):
    """The op as differentiable ATen ops: what the backward differentiates when a graph of it is wanted."""
    up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=align_corners)
    pre = (F.conv2d(up, weight_low, padding=dilation, dilation=dilation)
           + F.conv2d(high, weight_high[:, :, None, None]) + bias[None, :, None, None])
    return torch.relu(pre)


def _backward_with_graph(ctx, grad):
    """Double backward: the gradients as a differentiable function of the inputs (create_graph=True)."""
    low, high, weight_low, weight_high, bias, _ = ctx.saved_tensors
    inputs = (low, high, weight_low, weight_high, bias)
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i]]
    out = cascade_feature_fusion_composed(*inputs, ctx.dilation, ctx.align_corners)
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    result = [None] * 7
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


def cascade_feature_fusion_backward(ctx, grad):
    """First-order gradients from ATen's convolution backward on the inputs' device; when autograd records
    the backward itself (create_graph=True), the gradients of the composed op instead."""
    if torch.is_grad_enabled():
        return _backward_with_graph(ctx, grad)
    low, high, weight_low, weight_high, _, out = ctx.saved_tensors
    d = ctx.dilation
    grad = grad * (out > 0)
    # The resize's own autograd gives low's gradient: calling upsample_bilinear2d_backward directly fails
    # under dynamic shapes (torch.compile, opcheck) in current torch releases.
    with torch.enable_grad():
        low_leaf = low.detach().requires_grad_(ctx.needs_input_grad[0])
        up = F.interpolate(low_leaf, size=high.shape[-2:], mode="bilinear", align_corners=ctx.align_corners)
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


def _register():
    ops = [torch.ops.icnet.cascade_feature_fusion_triton.default]
    if native_available():
        ops.append(torch.ops.icnet.cascade_feature_fusion.default)
    for op in ops:
        torch.library.register_fake(op)(cascade_feature_fusion_fake)
        torch.library.register_autograd(op, cascade_feature_fusion_backward,
                                        setup_context=cascade_feature_fusion_setup_context)


_register()
