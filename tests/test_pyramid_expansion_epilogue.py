"""The folded pyramid pooling + 1x1 convolution (icnet_kernels.triton.pyramid_expansion_epilogue) against
conv1x1(pyramid_pool_sum(x)) in float64: random shapes, bins, explicit and adaptive pooling, layouts, 16-bit maps, the
released geometry; NaN confinement, empty batches and bad arguments. Outputs start as NaN (conftest), so
an element the kernel never writes fails the comparison."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from icnet.model import PPM_BINS, PyramidPooling, RELEASED_PPM_KERNELS, RELEASED_PPM_MAP, RELEASED_PPM_STRIDES
from icnet.model import pyramid_pooling_geometry
from icnet_kernels.reference import pyramid_pool_sum_reference
from icnet_kernels.triton.pyramid_expansion_epilogue import (pooled_grids, pyramid_expansion_epilogue_triton,
                                                             pyramid_fold_tables)
from tests.helpers import ATOL, GPU, LAYOUTS, assert_within_budget, dtypes_for, in_layout

DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module", params=[DEVICE], ids=[f"triton-{DEVICE}"])
def device(request):
    """Where the kernel runs, named in the test id: a GPU session selects its tests by "cuda"."""
    return request.param


def conv_of_pyramid(x, weight, bias, bins, kernel_sizes, strides, align_corners, relu):
    """The unfused definition: the pyramid op's reference, then the 1x1 convolution, bias and ReLU."""
    y = F.conv2d(pyramid_pool_sum_reference(x, bins, kernel_sizes, strides, align_corners), weight, bias)
    return torch.relu(y) if relu else y


def make_inputs(n, ci, co, h, w, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(co, ci, 1, 1, generator=g, dtype=torch.float64) / ci ** 0.5
    bias = torch.randn(co, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (x, weight, bias))


def fold(x, weight, bias, bins, kernel_sizes, strides, align_corners, relu, layout="contiguous"):
    """The fold as the plan runs it: y = W x by ATen's convolution in x's layout, the pooled grids of y, the
    kernel."""
    y = in_layout(F.conv2d(x, weight), layout)
    tables = pyramid_fold_tables(*x.shape[-2:], bins, kernel_sizes, strides, align_corners, device=x.device)
    return pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), bias, tables, relu)


def check(x, weight, bias, bins, kernel_sizes, strides, align_corners, relu, layout, what=""):
    out = fold(x, weight, bias, bins, kernel_sizes, strides, align_corners, relu, layout)
    args = (bins, kernel_sizes, strides, align_corners, relu)
    exact = conv_of_pyramid(x.double(), weight.double(), bias.double(), *args)
    same_precision = conv_of_pyramid(x, weight, bias, *args)
    assert out.shape == exact.shape and out.dtype == x.dtype
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_within_budget(out, exact, same_precision, ATOL[x.dtype], what)


@st.composite
def explicit_windows(draw, length: int, n: int):
    """A (kernel, stride) along a side of length that gives n pooled positions: (length - k) // s + 1 == n."""
    stride = draw(st.integers(1, max(1, (length - 1) // max(1, n - 1))))
    kernel = length - (n - 1) * stride
    return kernel - draw(st.integers(0, min(stride, kernel) - 1)), stride


@settings(max_examples=12)
@given(data=st.data())
def test_fold_matches_the_convolution_of_pyramid_pooling(device, data):
    h, w = data.draw(st.integers(1, 12), label="h"), data.draw(st.integers(1, 12), label="w")
    bins = data.draw(st.lists(st.integers(1, min(h, w, 6)), min_size=1, max_size=4), label="bins")
    kernel_sizes = strides = None
    if data.draw(st.booleans(), label="explicit pooling"):
        windows = [(data.draw(explicit_windows(h, n)), data.draw(explicit_windows(w, n))) for n in bins]
        kernel_sizes = [(wh[0], ww[0]) for wh, ww in windows]
        strides = [(wh[1], ww[1]) for wh, ww in windows]
    n, ci, co = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 20))
    dtype = data.draw(st.sampled_from(dtypes_for("triton", device)), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    align_corners, relu = data.draw(st.booleans(), label="align_corners"), data.draw(st.booleans(), label="relu")
    x, weight, bias = make_inputs(n, ci, co, h, w, dtype, data.draw(st.integers(0, 2**31 - 1)), device)
    check(x, weight, bias, bins, kernel_sizes, strides, align_corners, relu, layout,
          f"{h}x{w} bins {bins} {kernel_sizes} {strides} {layout} {dtype}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_released_geometry_on_its_33x65_map(device, layout):
    """ICNet's own pooling windows, with more channels and output channels than one tile."""
    x, weight, bias = make_inputs(1, 24, 20, *RELEASED_PPM_MAP, torch.float32, seed=7, device=device)
    check(x, weight, bias, PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES, True, True, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_maps(device, dtype, layout):
    """16-bit y and output, pooled and expanded in float32: within twice the error of the same composition in
    the same dtype (the interpreter runs these too: the kernel's products are float32 whatever y's dtype)."""
    x, weight, bias = make_inputs(2, 8, 12, 9, 13, dtype, seed=6, device=device)
    check(x, weight, bias, PPM_BINS, None, None, True, True, layout, f"{dtype} {layout}")


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (2, 3)])
def test_maps_smaller_than_the_bins(device, size):
    """The plan's adaptive geometry on maps smaller than the largest bin (each bin clamped to the shorter side)."""
    x, weight, bias = make_inputs(2, 5, 6, *size, torch.float32, seed=8, device=device)
    check(x, weight, bias, *pyramid_pooling_geometry(*size), True, True, "contiguous")


@pytest.mark.parametrize("size", [RELEASED_PPM_MAP, (1, 1), (2, 7), (6, 6), (5, 9), (33, 64), (34, 65)])
def test_the_plans_geometry_is_the_models(size):
    """pyramid_pooling_geometry, which the fold builds its tables from, pools exactly as icnet.model's
    PyramidPooling on the same map."""
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    expected = PyramidPooling(fused=False)(x)
    assert torch.equal(pyramid_pool_sum_reference(x, *pyramid_pooling_geometry(*size), True), expected)


def test_a_nan_stays_in_its_channel_plane(device):
    """NaN in y reaches the output at its own pixel; the dense expansion may spread it over its channel plane,
    but never into another channel or image."""
    _, _, bias = make_inputs(2, 3, 4, 5, 7, torch.float32, seed=9, device=device)
    y = torch.randn(2, 4, 5, 7, device=device)
    y[1, 2, 3, 4] = float("nan")
    tables = pyramid_fold_tables(5, 7, (1, 2, 3), device=device)
    out = pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), bias, tables, relu=True)
    assert out[1, 2, 3, 4].isnan()
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[1, 2] = False
    assert not out[clean].isnan().any()


def test_empty_batch(device):
    y = torch.randn(0, 4, 5, 7, device=device)
    tables = pyramid_fold_tables(5, 7, (1, 2), device=device)
    assert pyramid_expansion_epilogue_triton(y, pooled_grids(y, tables), torch.zeros(4, device=device),
                                             tables).shape == (0, 4, 5, 7)


def bad_arguments():
    y = torch.randn(1, 4, 5, 7, device=DEVICE)
    tables = pyramid_fold_tables(5, 7, (1, 2), device=DEVICE)
    grids, bias = pooled_grids(y, tables), torch.zeros(4, device=DEVICE)
    other = pyramid_fold_tables(5, 8, (1, 2), device=DEVICE)
    return {
        "y-rank": ((y[0], grids, bias, tables), "y"),
        "y-integer": ((y.long(), grids, bias, tables), "y"),
        "tables-size": ((y, grids, bias, other), "tables"),
        "grids-shape": ((y, grids[:, :2], bias, tables), "grids"),
        "grids-dtype": ((y, grids.double(), bias, tables), "grids"),
        "bias-length": ((y, grids, bias[:3], tables), "bias"),
    }


@pytest.mark.parametrize("name", list(bad_arguments()))
def test_bad_arguments_are_refused_by_name(name):
    args, message = bad_arguments()[name]
    with pytest.raises(ValueError, match=message):
        pyramid_expansion_epilogue_triton(*args)
