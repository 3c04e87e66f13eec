"""Summed pyramid pooling: reference vs an independent composition, every backend vs the reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import icnet_kernels
from icnet_kernels import PyramidPoolingSum, pyramid_pool_sum, pyramid_pool_sum_reference
from icnet_kernels.reference import pyramid_bin_matrices
from icnet.model import PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES
from tests.helpers import ATOL, LAYOUTS, assert_within_budget, backend_cases, dtypes_for, in_layout, op_cases

ICNET_BINS, ICNET_KERNELS, ICNET_STRIDES = PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES


def composed(x, bins, kernel_sizes=None, strides=None, align_corners=True):
    """The pooling + interpolate + add composition the reference must agree with."""
    out = x
    for i, n in enumerate(bins):
        pooled = F.adaptive_avg_pool2d(x, n) if kernel_sizes is None else F.avg_pool2d(x, kernel_sizes[i], strides[i])
        out = out + F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)
    return out


@st.composite
def explicit_geometry(draw, height, width, bins):
    """Kernel and stride per bin and axis such that (L - k) // s + 1 == bin."""
    kernels, strides = [], []
    for n in bins:
        pair_k, pair_s = [], []
        for length in (height, width):
            s = draw(st.integers(1, length if n == 1 else (length - 1) // (n - 1)))
            k = draw(st.integers(max(1, length - n * s + 1), length - (n - 1) * s))
            pair_k.append(k)
            pair_s.append(s)
        kernels.append(tuple(pair_k))
        strides.append(tuple(pair_s))
    return tuple(kernels), tuple(strides)


@st.composite
def pyramid_case(draw, max_planes, max_side):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, max(1, max_planes // n)))
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    bins = tuple(draw(st.lists(st.integers(1, min(height, width, 8)), min_size=1, max_size=4)))
    if draw(st.booleans()):
        kernel_sizes, strides = draw(explicit_geometry(height, width, bins))
    else:
        kernel_sizes = strides = None
    align_corners = draw(st.booleans())
    return (n, c, height, width), bins, kernel_sizes, strides, align_corners


@given(pyramid_case(max_planes=12, max_side=40))
def test_reference_agrees_with_pool_interpolate_composition(case):
    shape, bins, kernel_sizes, strides, align_corners = case
    x = torch.randn(shape, dtype=torch.float64)
    expected = composed(x, bins, kernel_sizes, strides, align_corners)
    actual = pyramid_pool_sum_reference(x, bins, kernel_sizes, strides, align_corners)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_reference_reproduces_released_icnet_pooling():
    x = torch.randn(2, 5, 33, 65, dtype=torch.float64)
    expected = composed(x, ICNET_BINS, ICNET_KERNELS, ICNET_STRIDES)
    actual = pyramid_pool_sum_reference(x, ICNET_BINS, ICNET_KERNELS, ICNET_STRIDES)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def check_against_reference(backend, device, x, bins, kernel_sizes, strides, align_corners):
    out = pyramid_pool_sum(x, bins, kernel_sizes, strides, align_corners, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    exact = pyramid_pool_sum_reference(x.double(), bins, kernel_sizes, strides, align_corners)
    same_precision = composed(x, bins, kernel_sizes, strides, align_corners)
    assert_within_budget(out, exact, same_precision, ATOL[x.dtype], f"{backend}-{device} {x.dtype}")


@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
def test_matches_reference_on_random_inputs(backend, device, data):
    interpreted = backend == "triton" and device == "cpu"
    shape, bins, kernel_sizes, strides, align_corners = data.draw(
        pyramid_case(max_planes=6 if interpreted else 300, max_side=24 if interpreted else 70))
    dtype = data.draw(st.sampled_from(dtypes_for(backend, device)))
    layout = data.draw(st.sampled_from(LAYOUTS))
    x = in_layout(torch.randn(shape, device=device).to(dtype), layout)
    check_against_reference(backend, device, x, bins, kernel_sizes, strides, align_corners)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("shape", [(1, 7, 33, 65), (2, 3, 65, 129)], ids=["33x65", "65x129"])
def test_icnet_shapes_adaptive_and_released_geometry(backend, device, shape):
    x = torch.randn(shape, device=device)
    check_against_reference(backend, device, x, ICNET_BINS, None, None, True)
    if shape[-2:] == (33, 65):
        check_against_reference(backend, device, x, ICNET_BINS, ICNET_KERNELS, ICNET_STRIDES, True)


@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
def test_backward_matches_reference(backend, device, data):
    interpreted = backend == "triton" and device == "cpu"
    shape, bins, kernel_sizes, strides, align_corners = data.draw(
        pyramid_case(max_planes=4 if interpreted else 40, max_side=20 if interpreted else 50))
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    (actual,) = torch.autograd.grad(pyramid_pool_sum(x, bins, kernel_sizes, strides, align_corners, backend=backend),
                                    x, grad)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(pyramid_pool_sum_reference(x64, bins, kernel_sizes, strides, align_corners),
                                   x64, grad.double())
    x32 = x.detach().requires_grad_()
    (same_precision,) = torch.autograd.grad(composed(x32, bins, kernel_sizes, strides, align_corners), x32, grad)
    assert_within_budget(actual, exact, same_precision, ATOL[torch.float32], f"grad {backend}-{device}")


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("geometry", ["adaptive", "explicit"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_gradcheck_float64_native_cpu(geometry, align_corners):
    kernel_sizes, strides = (((7, 9), (4, 5)), ((7, 9), (3, 4))) if geometry == "explicit" else (None, None)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return pyramid_pool_sum(t, (1, 2), kernel_sizes, strides, align_corners, backend="native")

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("name,device", op_cases("pyramid_pool_sum") + op_cases("pyramid_pool_sum_backward"))
def test_opcheck(name, device):
    op = getattr(torch.ops.icnet, name)
    x = torch.randn(2, 3, 9, 11, device=device, requires_grad=True)
    torch.library.opcheck(op, (x, [1, 2, 3], [], [], True))
    torch.library.opcheck(op, (x, [1, 3], [9, 11, 3, 3], [1, 1, 3, 4], False))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), [2], [], [], False))


def test_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.ppm = PyramidPoolingSum(ICNET_BINS, ICNET_KERNELS, ICNET_STRIDES)

        def forward(self, x):
            return torch.relu(self.ppm(self.conv(x)))

    model = Head().eval()
    x = torch.randn(2, 4, 33, 65)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("backend,device", backend_cases())
def test_empty_batch_and_nan(backend, device):
    empty = torch.randn(0, 3, 9, 9, device=device)
    assert pyramid_pool_sum(empty, (1, 3), backend=backend).shape == empty.shape
    x = torch.randn(1, 2, 9, 9, device=device)
    x[0, 1, 4, 4] = float("nan")
    out = pyramid_pool_sum(x, (1, 3), backend=backend)
    assert out[0, 1].isnan().all()  # the bin-1 mean carries the NaN everywhere in its plane
    assert not out[0, 0].isnan().any()


BAD_INPUTS = [
    (lambda: torch.randn(3, 9, 9), {}, "4-D"),
    (lambda: torch.randn(1, 2, 9, 9).long(), {}, "floating"),
    (lambda: torch.randn(1, 2, 0, 9), {}, "non-empty"),
    (lambda: torch.randn(1, 2, 5, 9), {"bins": (1, 6)}, "bins"),
    (lambda: torch.randn(1, 2, 5, 9), {"bins": ()}, "bins"),
    (lambda: torch.randn(1, 2, 5, 9), {"bins": (0,)}, "bins"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (1, 3), "kernel_sizes": [9], "strides": [9, 3]}, "kernel_sizes"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (1, 3), "kernel_sizes": [9, 3], "strides": [9]}, "strides"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (1, 3), "kernel_sizes": [9, 3]}, "kernel_sizes and strides"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (3,), "kernel_sizes": [4], "strides": [4]}, "must agree"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (3,), "kernel_sizes": [12], "strides": [3]}, "kernel_sizes"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (1.5,)}, "bins"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (True, 2)}, "bins"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": tuple(range(1, 10))}, "bins"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": (3,), "kernel_sizes": [3.0], "strides": [3]}, "kernel_sizes"),
    (lambda: torch.randn(1, 2, 9, 9), {"bins": 3}, "bins"),
    (lambda: [[1.0]], {}, "x"),
]


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("make,kwargs,message", BAD_INPUTS)
def test_bad_input_is_rejected_with_the_argument_named(backend, make, kwargs, message):
    if backend == "native" and not icnet_kernels.native_available():
        pytest.skip("_C not built")
    with pytest.raises(ValueError, match=message):
        pyramid_pool_sum(make(), backend=backend, **kwargs)


DIRECT_BAD_INPUTS = [  # (x, bins, kernel_sizes, strides) as the schema takes them, flattened
    (lambda: torch.randn(3, 9, 9), [1], [], [], "4-D"),
    (lambda: torch.randn(1, 2, 9, 9).long(), [1], [], [], "floating"),
    (lambda: torch.randn(1, 2, 0, 9), [1], [], [], "non-empty"),
    (lambda: torch.randn(1, 2, 5, 9), [1, 6], [], [], "bins"),
    (lambda: torch.randn(1, 2, 5, 9), [], [], [], "bins"),
    (lambda: torch.randn(1, 2, 9, 9), [1, 3], [9, 9], [9, 9, 3, 3], "kernel_sizes"),
    (lambda: torch.randn(1, 2, 9, 9), [1, 3], [9, 9, 3, 3], [9, 9], "strides"),
    (lambda: torch.randn(1, 2, 9, 9), [1, 3], [9, 9, 3, 3], [], "both"),
    (lambda: torch.randn(1, 2, 9, 9), [3], [4, 4], [4, 4], "must agree"),
    (lambda: torch.randn(1, 2, 9, 9), [0], [], [], "bins"),
    (lambda: torch.randn(1, 2, 9, 9), list(range(1, 10)), [], [], "bins"),
    (lambda: torch.randn(1, 2, 9, 9), [3], [0, 3], [3, 3], "kernel_sizes"),
    (lambda: torch.randn(1, 2, 9, 9), [3], [3, 3], [3, 0], "strides"),
]


def raw_op_cases():
    cases = []
    for name in ("pyramid_pool_sum_triton", "pyramid_pool_sum_backward_triton"):
        cases += [pytest.param(name, "cpu", id=name), pytest.param(name, "meta", id=f"{name}-fake")]
    if icnet_kernels.native_available():
        for name in ("pyramid_pool_sum", "pyramid_pool_sum_backward"):
            cases += [pytest.param(name, "cpu", id=name), pytest.param(name, "meta", id=f"{name}-fake")]
    return cases


@pytest.mark.parametrize("name,device", raw_op_cases())
@pytest.mark.parametrize("make,bins,kernel_sizes,strides,message", DIRECT_BAD_INPUTS)
def test_op_called_directly_checks_its_arguments(name, device, make, bins, kernel_sizes, strides, message):
    """Every implementation, the fake kernels (meta tensors, what torch.compile traces) included, rejects the
    same input with a ValueError naming the argument."""
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.icnet, name)(make().to(device), bins, kernel_sizes, strides, True)


@pytest.mark.parametrize("name,device", [c for c in raw_op_cases() if c.values[1] == "meta"])
def test_fake_kernel_rejects_maps_too_large_for_32_bit_indices(name, device):
    with pytest.raises(ValueError, match="too large"):
        getattr(torch.ops.icnet, name)(torch.empty(1, 1, 2**16, 2**15 + 1, device="meta"), [1], [], [], True)


def nonzero_weight_dependence(x_nonfinite: torch.Tensor, bins, align_corners) -> torch.Tensor:
    """Outputs that depend on a marked input through a nonzero weight: the identity term, then per bin the
    pooling windows and bilinear taps as 0/1 matrices."""
    mask = x_nonfinite.double()
    height, width = x_nonfinite.shape[-2:]
    reached = mask.clone()
    for pool_h, pool_w, interp_h, interp_w in pyramid_bin_matrices(height, width, bins, None, None, align_corners,
                                                                  torch.float64):
        pooled = torch.einsum("ih,nchw,jw->ncij", (pool_h != 0).double(), mask, (pool_w != 0).double())
        reached = reached + torch.einsum("ih,ncij,jw->nchw", (interp_h != 0).double(), pooled, (interp_w != 0).double())
    return reached > 0


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("bins", [(1, 2), (2, 3), (3,)], ids=str)
def test_non_finite_input_contract(backend, device, value, bins):
    """The README's contract: a non-finite input makes non-finite at least every output that depends on it
    through a nonzero weight and at most its own channel plane; every other output is finite and exact. The
    C++ and CUDA kernels skip zero weights, so for them the first set is exact; the reference and the Triton
    kernel multiply dense matrices, where 0 x inf is NaN, and reach the whole plane."""
    x = torch.randn(2, 3, 6, 7, device=device)
    x[1, 2, 2, 3] = value
    marked = ~x.isfinite()
    out = pyramid_pool_sum(x, bins, backend=backend)
    at_least = nonzero_weight_dependence(marked.cpu(), bins, True).to(device)
    at_most = marked.any(dim=(2, 3), keepdim=True).expand_as(x)
    assert (~out.isfinite())[at_least].all()
    assert out.isfinite()[~at_most].all()
    if backend == "native":
        assert torch.equal(~out.isfinite(), at_least)
    clean = torch.where(marked, torch.zeros_like(x), x)
    expected = pyramid_pool_sum_reference(clean, bins)
    torch.testing.assert_close(out[~at_most], expected[~at_most])
