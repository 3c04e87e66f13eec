"""Max pooling without indices: the Triton kernel against ATen's max pooling (the reference) on random
inputs and layouts, NaN and inf, windows that reach into the padding, bad input, opcheck and the
inference-only backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from icnet_kernels import max_pool, max_pool_reference
from tests.helpers import GPU, LAYOUTS, dtypes_for, in_layout

DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module", params=[DEVICE], ids=[f"triton-{DEVICE}"])
def device(request):
    """Where the kernel runs, named in the test id: a GPU session selects its tests by "cuda"."""
    return request.param


@st.composite
def pool_case(draw):
    kernel_size = draw(st.integers(1, 4))
    padding = draw(st.integers(0, kernel_size // 2))
    stride = draw(st.integers(1, 3))
    low = max(1, kernel_size - 2 * padding)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 70)), draw(st.integers(low, 12)), draw(st.integers(low, 12)))
    return shape, kernel_size, stride, padding


@settings(max_examples=20)
@given(case=pool_case(), layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(dtypes_for("triton", DEVICE)),
       seed=st.integers(0, 2**31 - 1))
def test_equals_aten_max_pooling(device, case, layout, dtype, seed):
    """A maximum is exact: the kernel must equal ATen bit for bit, in the input's memory format."""
    shape, kernel_size, stride, padding = case
    x = in_layout(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device),
                  layout)
    out = max_pool(x, kernel_size, stride, padding, backend="triton")
    expected = F.max_pool2d(x, kernel_size, stride, padding)
    assert out.shape == expected.shape and out.dtype == x.dtype and torch.equal(out, expected)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_icnets_pool1(device, layout):
    """3x3, stride 2, padding 1 on an odd map, as after ICNet's conv1 at 1025x2049 (here 1/16 of it)."""
    x = in_layout(torch.randn(1, 64, 33, 65, device=device), layout)
    torch.testing.assert_close(max_pool(x, backend="triton"), max_pool_reference(x), rtol=0, atol=0)


def test_nan_and_inf_propagate_like_aten(device):
    x = torch.randn(1, 3, 7, 9, device=device)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    x[0, 2] = float("-inf")
    out = max_pool(x, backend="triton")
    expected = F.max_pool2d(x, 3, 2, 1)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_empty_batch(device):
    assert max_pool(torch.randn(0, 3, 5, 5, device=device), backend="triton").shape == (0, 3, 3, 3)


BAD_INPUTS = {  # id: (x, kernel_size, stride, padding, the argument the message must name)
    "x-rank": (lambda: torch.randn(3, 5, 5), 3, 2, 1, "x"),
    "x-integer": (lambda: torch.ones(1, 1, 5, 5, dtype=torch.long), 3, 2, 1, "x"),
    "x-no-channels": (lambda: torch.randn(1, 0, 5, 5), 3, 2, 1, "x"),
    "x-smaller-than-window": (lambda: torch.randn(1, 2, 1, 5), 4, 1, 1, "x"),
    "kernel_size-0": (lambda: torch.randn(1, 1, 5, 5), 0, 1, 0, "kernel_size"),
    "kernel_size-too-large": (lambda: torch.randn(1, 1, 40, 40), 17, 1, 0, "kernel_size"),
    "stride-0": (lambda: torch.randn(1, 1, 5, 5), 3, 0, 1, "stride"),
    "padding-negative": (lambda: torch.randn(1, 1, 5, 5), 3, 2, -1, "padding"),
    "padding-over-half": (lambda: torch.randn(1, 1, 5, 5), 3, 2, 2, "padding"),
}


def params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("make,kernel_size,stride,padding,message", params({
    **BAD_INPUTS, "kernel_size-float": (lambda: torch.randn(1, 1, 5, 5), 3.0, 2, 1, "kernel_size"),
    "stride-bool": (lambda: torch.randn(1, 1, 5, 5), 3, True, 1, "stride")}))
def test_bad_input_is_rejected_with_the_argument_named(backend, make, kernel_size, stride, padding, message):
    with pytest.raises(ValueError, match=message):
        max_pool(make().to(DEVICE), kernel_size, stride, padding, backend=backend)


@pytest.mark.parametrize("device", [DEVICE, "meta"], ids=[f"kernel-{DEVICE}", "fake"])
@pytest.mark.parametrize("make,kernel_size,stride,padding,message", params({
    **BAD_INPUTS, "x-float64": (lambda: torch.randn(1, 1, 5, 5, dtype=torch.float64), 3, 2, 1, "x")}))
def test_op_called_directly_checks_its_arguments(device, make, kernel_size, stride, padding, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.icnet.max_pool_triton(make().to(device), kernel_size, stride, padding)


def test_opcheck(device):
    x = torch.randn(2, 3, 7, 8, device=device)
    torch.library.opcheck(torch.ops.icnet.max_pool_triton, (x, 3, 2, 1))
    torch.library.opcheck(torch.ops.icnet.max_pool_triton, (x.contiguous(memory_format=torch.channels_last), 2, 2, 0))


def test_backward_says_the_op_is_inference_only():
    out = max_pool(torch.randn(1, 2, 5, 5, device=DEVICE, requires_grad=True), backend="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
