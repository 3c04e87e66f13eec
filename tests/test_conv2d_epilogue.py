"""Convolution with its epilogue (bias, residual, ReLU) in Triton against ATen's composition on random
geometries, split reductions and layouts; NaN, bad input, opcheck and the inference-only backward."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from icnet_kernels import conv2d_epilogue, conv2d_epilogue_reference
from tests.helpers import ATOL, GPU, LAYOUTS, assert_within_budget, dtypes_for, in_layout

DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module", params=[DEVICE], ids=[f"triton-{DEVICE}"])
def device(request):
    """Where the kernel runs, named in the test id: a GPU session selects its tests by "cuda"."""
    return request.param


def make_inputs(n, ci, co, k, h, w, out_size, dtype=torch.float32, device=DEVICE, seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64) / (ci * k * k) ** 0.5
    bias = torch.randn(co, generator=g, dtype=torch.float64)
    res = torch.randn(n, co, *out_size, generator=g, dtype=torch.float64) if residual else None
    return tuple(None if t is None else t.to(dtype=dtype, device=device) for t in (x, weight, bias, res))


def check(x, weight, bias, residual, stride, padding, dilation, relu, split_k, what=""):
    out = conv2d_epilogue(x, weight, bias, residual, stride, padding, dilation, relu, split_k, backend="triton")
    exact = conv2d_epilogue_reference(x.double(), weight.double(), bias.double(),
                                      None if residual is None else residual.double(), stride, padding, dilation,
                                      relu)
    same_precision = conv2d_epilogue_reference(x, weight, bias, residual, stride, padding, dilation, relu)
    assert out.shape == exact.shape and out.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_budget(out, exact, same_precision, ATOL[x.dtype], what)


@settings(max_examples=15)
@given(data=st.data())
def test_matches_aten_on_random_geometries(device, data):
    k = data.draw(st.sampled_from([1, 3]), label="kernel")
    dilation = data.draw(st.integers(1, 4), label="dilation")
    stride = data.draw(st.integers(1, 2), label="stride")
    padding = data.draw(st.integers(0, dilation * (k // 2) + 1), label="padding")
    span = dilation * (k - 1) + 1
    h = data.draw(st.integers(max(1, span - 2 * padding), 9), label="h")
    w = data.draw(st.integers(max(1, span - 2 * padding), 9), label="w")
    n, ci, co = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    out_size = ((h + 2 * padding - span) // stride + 1, (w + 2 * padding - span) // stride + 1)
    residual, relu = data.draw(st.booleans(), label="residual"), data.draw(st.booleans(), label="relu")
    split_k = data.draw(st.integers(1, 4), label="split_k")
    dtype = data.draw(st.sampled_from(dtypes_for("triton", device)), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    x, weight, bias, res = make_inputs(n, ci, co, k, h, w, out_size, dtype, device,
                                       data.draw(st.integers(0, 2**31 - 1)), residual)
    check(in_layout(x, layout), weight, bias, res, stride, padding, dilation, relu, split_k, f"{layout} {dtype}")


@pytest.mark.parametrize("split_k", [1, 3], ids=["whole", "split"])
def test_icnet_like_sub4_conv(device, split_k):
    """A bottleneck's dilated 3x3 on a small map with more channels than one reduction block."""
    x, weight, bias, res = make_inputs(1, 40, 24, 3, 5, 9, (5, 9), device=device, seed=3)
    check(x.contiguous(memory_format=torch.channels_last), weight, bias, res, 1, 4, 4, True, split_k)


def test_nan_propagates_to_the_outputs_that_read_it(device):
    x, weight, bias, _ = make_inputs(1, 3, 4, 3, 7, 7, (7, 7), device=device, seed=4, residual=False)
    x[0, 1, 3, 3] = float("nan")
    out = conv2d_epilogue(x, weight, bias, padding=1, relu=True, split_k=2, backend="triton")
    expected = conv2d_epilogue_reference(x, weight, bias, None, 1, 1, 1, True)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any() and not out.isnan().all()


def test_empty_batch(device):
    x, weight, bias, _ = make_inputs(0, 3, 4, 3, 5, 5, (5, 5), device=device, residual=False)
    assert conv2d_epilogue(x, weight, bias, padding=1, backend="triton").shape == (0, 4, 5, 5)


def base():
    return make_inputs(1, 3, 4, 3, 5, 5, (5, 5), residual=True)


BAD_INPUTS = {  # id: (function arguments from the base inputs, the argument the message must name)
    "x-rank": (lambda x, wt, b, r: (x[0], wt, b, r, 1, 1, 1), "x"),
    "x-integer": (lambda x, wt, b, r: (x.long(), wt, b, r, 1, 1, 1), "x"),
    "weight-channels": (lambda x, wt, b, r: (x, wt[:, :2], b, r, 1, 1, 1), "weight"),
    "weight-not-square": (lambda x, wt, b, r: (x, wt[:, :, :2], b, r, 1, 1, 1), "weight"),
    "weight-too-large": (lambda x, wt, b, r: (x, torch.randn(4, 3, 9, 9), b, None, 1, 4, 1), "weight"),
    "weight-dtype": (lambda x, wt, b, r: (x, wt.double(), b, r, 1, 1, 1), "weight"),
    "bias-length": (lambda x, wt, b, r: (x, wt, b[:2], r, 1, 1, 1), "bias"),
    "residual-shape": (lambda x, wt, b, r: (x, wt, b, r[:, :2], 1, 1, 1), "residual"),
    "residual-dtype": (lambda x, wt, b, r: (x, wt, b, r.double(), 1, 1, 1), "residual"),
    "stride-0": (lambda x, wt, b, r: (x, wt, b, None, 0, 1, 1), "stride"),
    "padding-negative": (lambda x, wt, b, r: (x, wt, b, None, 1, -1, 1), "padding"),
    "dilation-0": (lambda x, wt, b, r: (x, wt, b, None, 1, 1, 0), "dilation"),
    "map-smaller-than-window": (lambda x, wt, b, r: (x, wt, b, None, 1, 0, 3), "x"),
}


def params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("make,message", params(BAD_INPUTS))
def test_bad_input_is_rejected_with_the_argument_named(backend, make, message):
    x, weight, bias, residual, stride, padding, dilation = make(*base())
    with pytest.raises(ValueError, match=message):
        conv2d_epilogue(x, weight, bias, residual, stride, padding, dilation, backend=backend)


@pytest.mark.parametrize("device", [DEVICE, "meta"], ids=[f"kernel-{DEVICE}", "fake"])
@pytest.mark.parametrize("make,message", params({
    **BAD_INPUTS, "split_k-0": (lambda x, wt, b, r: (x, wt, b, None, 1, 1, 1), "split_k")}))
def test_op_called_directly_checks_its_arguments(device, make, message):
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in make(*base())]
    split_k = 0 if message == "split_k" else 1
    with pytest.raises(ValueError, match=message):
        torch.ops.icnet.conv2d_epilogue_triton(*args, True, split_k)


def test_opcheck(device):
    x, weight, bias, res = make_inputs(1, 3, 4, 3, 5, 6, (3, 3), device=device)
    op = torch.ops.icnet.conv2d_epilogue_triton
    torch.library.opcheck(op, (x, weight, bias, res, 2, 1, 1, True, 2))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), weight, bias, None, 1, 0, 1, False, 1))


def test_backward_says_the_op_is_inference_only():
    x, weight, bias, _ = base()
    out = conv2d_epilogue(x.requires_grad_(), weight, bias, padding=1, backend="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
