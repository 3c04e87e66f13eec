"""Cascade feature fusion backward: gradients of every input on every backend and kernel path vs the float64
reference, gradcheck and second-order gradients."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import icnet_kernels
from tests.cascade_feature_fusion_cases import (
    INPUT_NAMES, RELU_MARGIN, Geometry, as_float64, folded_reference, geometry, gradient_atol, gradients, lay_out,
    make_inputs, pre_activation, reference, run_fused, scale_gradient_atol)
from tests.helpers import LAYOUTS, assert_within_budget, backend_cases, dtypes_for


@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
@settings(max_examples=max(5, settings.default.max_examples * 3 // 5))  # three autograd runs per example
def test_backward_matches_reference(backend, device, data):
    g = data.draw(geometry(backend, device, wide=False), label="geometry")
    dtype = data.draw(st.sampled_from(dtypes_for(backend, device)), label="dtype")
    low_layout = data.draw(st.sampled_from(LAYOUTS), label="low layout")
    high_layout = data.draw(st.sampled_from(LAYOUTS), label="high layout")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    inputs = make_inputs(g, dtype, device, seed)
    inputs64 = as_float64(inputs)
    grad_out = torch.randn(g.n, g.co, g.H, g.W, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64).to(device)
    grad_out = grad_out * (pre_activation(inputs64, g).abs() > RELU_MARGIN[dtype])

    actual = gradients(lambda t: run_fused(backend, lay_out(t, low_layout, high_layout), g), inputs,
                       grad_out.to(dtype))
    exact = gradients(lambda t: reference(t, g), inputs64, grad_out)
    same_precision = gradients(lambda t: folded_reference(lay_out(t, low_layout, high_layout), g), inputs,
                               grad_out.to(dtype))
    for name in INPUT_NAMES:
        assert actual[name].shape == inputs[name].shape
        atol = gradient_atol(exact[name], dtype)
        if name.startswith("scale_"):
            atol += scale_gradient_atol(inputs64, grad_out, g, name, dtype)
        assert_within_budget(actual[name], exact[name], same_precision[name], atol,
                             f"grad {name} {backend}-{device} {dtype} {g} {low_layout}/{high_layout}")


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("align_corners", [True, False], ids=["shortcut", "general"])
def test_backward_icnet_like_shape_native(align_corners):
    """ICNet's 1/16 -> 1/8 fusion at a quarter of its channels: the gradients sum over many more pixels here
    than in the random cases."""
    g = Geometry(2, 16, 16, 16, 17, 33, 33, 65, 2, align_corners)
    inputs = make_inputs(g, seed=13)
    inputs64 = as_float64(inputs)
    grad_out = torch.randn(g.n, g.co, g.H, g.W, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    grad_out = grad_out * (pre_activation(inputs64, g).abs() > RELU_MARGIN[torch.float32])
    actual = gradients(lambda t: run_fused("native", t, g), inputs, grad_out.float())
    exact = gradients(lambda t: reference(t, g), inputs64, grad_out)
    same_precision = gradients(lambda t: folded_reference(t, g), inputs, grad_out.float())
    for name in INPUT_NAMES:
        assert_within_budget(actual[name], exact[name], same_precision[name],
                             gradient_atol(exact[name], torch.float32), f"grad {name}")


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("g", [Geometry(1, 2, 3, 2, 3, 4, 5, 7, 2, True), Geometry(2, 2, 2, 3, 2, 3, 5, 4, 1, False),
                               Geometry(1, 2, 2, 2, 1, 2, 4, 4, 4, True)], ids=["shortcut", "general", "general-d4"])
def test_gradcheck_float64_native_cpu(g):
    assert g.shortcut == (g.dilation == 2)
    inputs = make_inputs(g, torch.float64, seed=4)
    leaves = tuple(inputs[k].requires_grad_() for k in INPUT_NAMES)

    def fn(*args):
        return run_fused("native", dict(zip(INPUT_NAMES, args)), g)

    assert torch.autograd.gradcheck(fn, leaves)




SECOND_ORDER_CASES = {  # one geometry per kernel path of the C++ kernel; the Triton op runs the first two
    "shortcut": Geometry(1, 2, 1, 2, 3, 3, 5, 5, 2, True),
    "tap-first": Geometry(1, 2, 1, 2, 2, 2, 4, 5, 1, False),
    "blocked": Geometry(1, 2, 1, 2, 3, 3, 4, 4, 2, False),
    "general-d4": Geometry(1, 1, 1, 2, 1, 2, 4, 4, 4, True),
}


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_second_order_gradients_match_the_reference(backend, device, case):
    """Gradients of gradients (create_graph=True), as gradient penalties need them: the op's backward is
    itself differentiated, on every path."""
    g = SECOND_ORDER_CASES[case]
    if backend == "triton" and case in ("blocked", "general-d4"):
        pytest.skip("the Triton kernel has two paths, both covered by the first two cases")
    if device == "cuda":
        pytest.skip("float64 second-order checks run on the CPU kernels")
    assert g.path("native", "cpu") == case or case == "general-d4"
    inputs = make_inputs(g, torch.float64, seed=21)
    dtype = torch.float64 if backend != "triton" else torch.float32
    inputs = {k: v.to(dtype) for k, v in inputs.items()}

    def second_order(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = fn(leaves)
        grad_weight_low, = torch.autograd.grad(out.pow(2).sum(), leaves["weight_low"], create_graph=True)
        return torch.autograd.grad(grad_weight_low.pow(2).sum(), [leaves[k] for k in INPUT_NAMES])

    actual = second_order(lambda t: run_fused(backend, t, g))
    expected = second_order(lambda t: reference(t, g))
    tolerance = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-3}
    for name, a, e in zip(INPUT_NAMES, actual, expected):
        torch.testing.assert_close(a, e, **tolerance, msg=f"second-order gradient of {name}")


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_gradgradcheck_float64_native_cpu(case):
    g = SECOND_ORDER_CASES[case]
    inputs = make_inputs(g, torch.float64, seed=22)
    inputs["shift_low"] = inputs["shift_low"] + 3.0  # keep pre-activations clear of the ReLU's kink
    leaves = tuple(inputs[k].requires_grad_() for k in INPUT_NAMES)

    def fn(*args):
        return run_fused("native", dict(zip(INPUT_NAMES, args)), g)

    assert torch.autograd.gradgradcheck(fn, leaves)
