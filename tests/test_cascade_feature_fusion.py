"""Cascade feature fusion: every backend vs the float64 reference, autograd, opcheck, the module, bad input.

The kernels take two paths: the exact shortcut (align_corners=True, dilation 2, H = 2h-1, W = 2w-1, H and
W >= 3), whose border rows 1, H-2 and columns 1, W-2 need a separate correction, and the general path. The
strategies below draw the shortcut's geometry about half the time so that both are always exercised.
"""

import copy
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings, strategies as st

import icnet_kernels
from icnet_kernels import CascadeFeatureFusion, cascade_feature_fusion, cascade_feature_fusion_reference
from tests.helpers import ATOL, LAYOUTS, assert_within_budget, backend_cases, dtypes_for, in_layout

INPUT_NAMES = ("low", "high", "weight_low", "weight_high", "scale_low", "shift_low", "scale_high", "shift_high")


@dataclass(frozen=True)
class Geometry:
    n: int
    cl: int
    ch: int
    co: int
    h: int
    w: int
    H: int
    W: int
    dilation: int
    align_corners: bool

    @property
    def shortcut(self) -> bool:
        """The kernels' exact-shortcut condition (csrc/common/cff_geometry.h)."""
        return (self.align_corners and self.dilation == 2 and self.H == 2 * self.h - 1 and self.W == 2 * self.w - 1
                and self.H >= 3 and self.W >= 3)


def make_inputs(g: Geometry, dtype=torch.float32, device="cpu", seed=0, weight_high_4d=False):
    """The eight inputs by name, drawn in float64 and rounded to dtype. Weights are scaled by 1/sqrt(fan-in)
    as in a trained network, so that outputs are O(1) and the absolute atol means what it says."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    return {
        "low": randn(g.n, g.cl, g.h, g.w),
        "high": randn(g.n, g.ch, g.H, g.W),
        "weight_low": randn(g.co, g.cl, 3, 3, scale=(9 * g.cl) ** -0.5),
        "weight_high": randn(*((g.co, g.ch, 1, 1) if weight_high_4d else (g.co, g.ch)), scale=g.ch ** -0.5),
        "scale_low": randn(g.co),  # both signs: a BatchNorm's gamma may be negative
        "shift_low": randn(g.co, scale=0.5),
        "scale_high": randn(g.co),
        "shift_high": randn(g.co, scale=0.5),
    }


def reference(inputs, g: Geometry, return_upsampled=False):
    """The reference, fed by name (its positional order differs from the public function's)."""
    return cascade_feature_fusion_reference(
        inputs["low"], inputs["high"], inputs["weight_low"], inputs["scale_low"], inputs["shift_low"],
        inputs["weight_high"], inputs["scale_high"], inputs["shift_high"], g.dilation, g.align_corners,
        return_upsampled)


def folded_reference(inputs, g: Geometry):
    """The reference computing what the fused op computes: both BatchNorms folded into the weights and one
    bias, by the same PyTorch ops the public function uses. Mathematically the reference; in finite
    precision the scales' gradients then come back through the folded weights' gradients (sums over every
    pixel), so this is the same-precision PyTorch run that gradients are held against."""
    co = inputs["weight_low"].shape[0]
    ones = torch.ones_like(inputs["scale_low"])
    weight_low = inputs["weight_low"] * inputs["scale_low"][:, None, None, None]
    weight_high = inputs["weight_high"].reshape(co, -1) * inputs["scale_high"][:, None]
    return cascade_feature_fusion_reference(
        inputs["low"], inputs["high"], weight_low, ones, inputs["shift_low"] + inputs["shift_high"],
        weight_high, ones, torch.zeros_like(ones), g.dilation, g.align_corners)


def as_float64(inputs):
    return {k: v.detach().double() for k, v in inputs.items()}


def expected_format(high: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout rule: channels_last iff high is channels_last and not also plain contiguous."""
    if high.is_contiguous(memory_format=torch.channels_last) and not high.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def run_fused(backend, inputs, g: Geometry, **kwargs):
    return cascade_feature_fusion(**inputs, dilation=g.dilation, align_corners=g.align_corners, backend=backend,
                                  **kwargs)


def check_forward(backend, device, inputs, g: Geometry, what=""):
    """Output shape, dtype, device and layout, and the error budget against the float64 reference.

    The same-precision PyTorch run is the reference at the inputs' dtype: ATen's CPU convolution and bilinear
    resize accept float16 and bfloat16 in this torch, so no rounded float32 stand-in is needed."""
    out = run_fused(backend, inputs, g)
    low = inputs["low"]
    assert out.shape == (g.n, g.co, g.H, g.W) and out.dtype == low.dtype and out.device == low.device
    if backend != "reference":
        assert out.is_contiguous(memory_format=expected_format(inputs["high"])), f"{what}: output layout"
    exact = reference(as_float64(inputs), g)
    same_precision = reference(inputs, g)
    assert_within_budget(out, exact, same_precision, ATOL[low.dtype], f"{backend}-{device} {low.dtype} {g} {what}")
    return out, exact, same_precision


# ---------------------------------------------------------------------------------------------------------------
# strategies

@st.composite
def spatial(draw, max_low, max_high):
    """(h, w, H, W, dilation, align_corners): half the time ICNet's exact 2x zoom (the shortcut), else any
    resize, 1x1 low maps and non-2x ratios included."""
    if draw(st.booleans()):
        h = draw(st.integers(2, (max_high + 1) // 2))
        w = draw(st.integers(2, (max_high + 1) // 2))
        return h, w, 2 * h - 1, 2 * w - 1, 2, True
    h = draw(st.integers(1, max_low))
    w = draw(st.integers(1, max_low))
    height = draw(st.integers(h, max_high))
    width = draw(st.integers(w, max_high))
    return h, w, height, width, draw(st.sampled_from((1, 2, 4))), draw(st.booleans())


@st.composite
def channels(draw, max_small, wide):
    """Mostly small counts (1 and odd ones included); now and then one of ICNet's 64/128 where allowed."""
    if wide and draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from((64, 128)))
    return draw(st.integers(1, max_small))


@st.composite
def geometry(draw, interpreted, wide=True):
    if interpreted:  # Triton's interpreter runs every program element by element in Python: keep it tiny
        max_low, max_high, max_small, wide = 5, 9, 8, False
    else:
        max_low, max_high, max_small = 12, 25, 9
    h, w, height, width, dilation, align_corners = draw(spatial(max_low, max_high))
    return Geometry(draw(st.integers(1, 2)), draw(channels(max_small, wide)), draw(channels(max_small, wide)),
                    draw(channels(max_small, wide)), h, w, height, width, dilation, align_corners)


def lay_out(inputs, low_layout, high_layout):
    return {**inputs, "low": in_layout(inputs["low"], low_layout), "high": in_layout(inputs["high"], high_layout)}


# ---------------------------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
def test_matches_reference_on_random_inputs(backend, device, data):
    g = data.draw(geometry(interpreted=backend == "triton" and device == "cpu"), label="geometry")
    event("exact shortcut" if g.shortcut else "general path")
    dtype = data.draw(st.sampled_from(dtypes_for(backend, device)), label="dtype")
    low_layout = data.draw(st.sampled_from(LAYOUTS), label="low layout")
    high_layout = data.draw(st.sampled_from(LAYOUTS), label="high layout")
    inputs = make_inputs(g, dtype, device, data.draw(st.integers(0, 2**31 - 1), label="seed"),
                         weight_high_4d=data.draw(st.booleans(), label="weight_high 4-D"))
    check_forward(backend, device, lay_out(inputs, low_layout, high_layout), g, f"{low_layout}/{high_layout}")


# Shapes that a random draw reaches only by luck: the smallest shortcut maps (H or W = 3, where row 1 is
# also row H-2), 1x1 low maps, no resize at all, a dilation larger than the map, near-misses of the shortcut.
EDGE_GEOMETRIES = [
    Geometry(1, 3, 2, 4, 2, 2, 3, 3, 2, True),
    Geometry(2, 1, 3, 5, 2, 5, 3, 9, 2, True),
    Geometry(1, 2, 1, 3, 5, 2, 9, 3, 2, True),
    Geometry(1, 3, 2, 4, 1, 1, 5, 7, 2, True),
    Geometry(1, 3, 2, 4, 1, 1, 5, 7, 1, False),
    Geometry(2, 3, 2, 3, 6, 7, 6, 7, 1, True),
    Geometry(1, 2, 3, 3, 3, 3, 5, 5, 4, True),
    Geometry(1, 4, 2, 3, 4, 6, 9, 17, 2, True),
    Geometry(1, 4, 2, 3, 5, 9, 9, 17, 2, False),
    Geometry(1, 4, 2, 3, 5, 9, 9, 17, 1, True),
    Geometry(1, 3, 3, 2, 4, 4, 8, 8, 2, False),
    Geometry(1, 3, 2, 4, 5, 6, 6, 8, 2, False),  # under a 2x pixel ratio: the CPU's blocked path, not tap-first
]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", EDGE_GEOMETRIES,
                         ids=lambda g: f"{g.h}x{g.w}to{g.H}x{g.W}-d{g.dilation}-ac{int(g.align_corners)}")
def test_edge_geometries(backend, device, g):
    interpreted = backend == "triton" and device == "cpu"  # its random cases cover the layouts
    for layout in ("contiguous",) if interpreted else ("contiguous", "channels_last"):
        check_forward(backend, device, lay_out(make_inputs(g, device=device, seed=7), layout, layout), g, layout)


ICNET_LIKE = Geometry(1, 16, 8, 16, 9, 17, 17, 33, 2, True)  # low 9x17 -> high 17x33, the exact shortcut


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("align_corners", [True, False], ids=["shortcut", "general"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_icnet_like_shape_native(align_corners, layout):
    g = replace(ICNET_LIKE, align_corners=align_corners)
    assert g.shortcut == align_corners
    check_forward("native", "cpu", lay_out(make_inputs(g, seed=3), layout, layout), g, layout)


def border_slices(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Rows 1 and H-2 and columns 1 and W-2: where the shortcut's zero-padding correction applies."""
    return torch.cat([t[:, :, [1, g.H - 2], :].flatten(1), t[:, :, :, [1, g.W - 2]].flatten(1)], dim=1)


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("align_corners", [True, False], ids=["shortcut", "general"])
def test_icnet_like_shape_border_rows_and_columns_native(align_corners):
    """A wrong padding correction changes only these pixels, so they get their own comparison: the float32
    budget on the slices alone, and float64 to round-off. Positive shifts keep almost every pixel clear of
    the ReLU, which would otherwise hide an error wherever both results are negative."""
    g = replace(ICNET_LIKE, align_corners=align_corners)
    for dtype, seed in ((torch.float32, 11), (torch.float64, 12)):
        inputs = make_inputs(g, dtype, seed=seed)
        inputs["shift_low"] = inputs["shift_low"].abs() + 2
        inputs["shift_high"] = inputs["shift_high"].abs() + 2
        out = run_fused("native", inputs, g)
        exact = reference(as_float64(inputs), g)
        assert (border_slices(exact, g) > 0).float().mean() > 0.9
        if dtype == torch.float64:
            torch.testing.assert_close(border_slices(out, g), border_slices(exact, g), rtol=0, atol=1e-12)
        else:
            assert_within_budget(border_slices(out, g), border_slices(exact, g),
                                 border_slices(reference(inputs, g), g), ATOL[dtype], "border rows/columns")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_default_scales_and_4d_weight_high(backend, device):
    """scale/shift None mean 1 and 0; weight_high [Co, Ch, 1, 1] means the same as [Co, Ch]."""
    g = Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True)
    inputs = make_inputs(g, device=device, seed=5)
    bare = {k: inputs[k] for k in ("low", "high", "weight_low", "weight_high")}
    out = run_fused(backend, bare, g)
    unit = {**inputs, "scale_low": torch.ones(g.co, device=device), "scale_high": torch.ones(g.co, device=device),
            "shift_low": torch.zeros(g.co, device=device), "shift_high": torch.zeros(g.co, device=device)}
    assert_within_budget(out, reference(as_float64(unit), g), reference(unit, g), ATOL[torch.float32], "defaults")
    four_d = {**inputs, "weight_high": inputs["weight_high"][:, :, None, None]}
    torch.testing.assert_close(run_fused(backend, four_d, g), run_fused(backend, inputs, g), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [ICNET_LIKE, Geometry(2, 3, 2, 4, 4, 5, 9, 11, 1, False)], ids=["shortcut", "general"])
def test_return_upsampled_is_interpolate(backend, device, g):
    if backend == "triton" and device == "cpu":
        g = replace(g, n=1, cl=3, ch=2, co=4, h=3, w=4, H=5, W=7)
    inputs = make_inputs(g, device=device, seed=2)
    out, up = run_fused(backend, inputs, g, return_upsampled=True)
    torch.testing.assert_close(out, run_fused(backend, inputs, g), rtol=0, atol=0)
    expected = F.interpolate(inputs["low"], size=(g.H, g.W), mode="bilinear", align_corners=g.align_corners)
    assert torch.equal(up, expected)


# ---------------------------------------------------------------------------------------------------------------
# backward

# A pixel whose pre-activation lies within a run's rounding error of 0 may take either ReLU branch, and its
# gradient is then anything between 0 and the upstream one, in the kernel as in PyTorch. The upstream gradient
# is zeroed there (float64 pre-activation within this margin), so the comparison measures the arithmetic.
RELU_MARGIN = {torch.float64: 0.0, torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.3}


def pre_activation(inputs64, g: Geometry) -> torch.Tensor:
    """The reference's argument of the ReLU, in float64: relu(x) - relu(-x) == x."""
    negated = {**inputs64, **{k: -inputs64[k] for k in ("scale_low", "shift_low", "scale_high", "shift_high")}}
    return reference(inputs64, g) - reference(negated, g)


def gradient_atol(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """ATOL, or one ulp of the gradient's largest value in dtype if that is more. Gradients are sums over up
    to N*H*W pixels, far from the O(1) that ATOL is set for: in float16 a gradient near 10 has an ulp of
    7.8e-3, so even a correctly rounded result may miss a fixed ATOL whenever PyTorch happens to round well."""
    largest = exact.abs().max().item()
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.tensor(largest).log2().floor().item() if largest > 0 else 0.0
    return max(ATOL[dtype], ulp)


def gradients(fn, inputs, grad_out):
    """d(fn(inputs) . grad_out) / d(each input). fn lays the leaves out itself, so that a strided view stays
    strided (a clone of one would not)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    return dict(zip(INPUT_NAMES, torch.autograd.grad(fn(leaves), [leaves[k] for k in INPUT_NAMES], grad_out)))


@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
@settings(max_examples=max(5, settings.default.max_examples * 3 // 5))  # three autograd runs per example
def test_backward_matches_reference(backend, device, data):
    interpreted = backend == "triton" and device == "cpu"
    g = data.draw(geometry(interpreted, wide=False), label="geometry")
    event("exact shortcut" if g.shortcut else "general path")
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
        assert_within_budget(actual[name], exact[name], same_precision[name], gradient_atol(exact[name], dtype),
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


# ---------------------------------------------------------------------------------------------------------------
# opcheck, torch.compile

def opcheck_cases():
    cases = []
    if icnet_kernels.native_available():
        cases.append(("cascade_feature_fusion", "cpu"))
    cases.append(("cascade_feature_fusion_triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available() and icnet_kernels.native_cuda_available():
        cases.append(("cascade_feature_fusion", "cuda"))
    return cases


@pytest.mark.parametrize("name,device", opcheck_cases())
@pytest.mark.parametrize("g", [Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True), Geometry(1, 2, 3, 3, 3, 3, 6, 5, 1, False)],
                         ids=["shortcut", "general"])
def test_opcheck(name, device, g):
    op = getattr(torch.ops.icnet, name)
    inputs = make_inputs(g, device=device, seed=9)
    folded = (inputs["weight_low"], inputs["weight_high"], inputs["shift_low"] + inputs["shift_high"])
    for layout in ("contiguous", "channels_last"):
        low, high = in_layout(inputs["low"], layout), in_layout(inputs["high"], layout)
        args = [t.detach().clone().requires_grad_() for t in (low, high, *folded)]
        torch.library.opcheck(op, (*args, g.dilation, g.align_corners))
        torch.library.opcheck(op, (low, high, *folded, g.dilation, g.align_corners))


def randomize_batch_norm(bn: torch.nn.BatchNorm2d, gen: torch.Generator):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.5)


def random_module(cl, ch, co, dilation=2, align_corners=True, backend=None, seed=0) -> CascadeFeatureFusion:
    torch.manual_seed(seed)
    module = CascadeFeatureFusion(cl, ch, co, dilation, align_corners, backend)
    gen = torch.Generator().manual_seed(seed)
    randomize_batch_norm(module.bn_low, gen)
    randomize_batch_norm(module.bn_high, gen)
    return module


def test_torch_compile_fullgraph():
    class Fusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reduce = torch.nn.Conv2d(6, 4, 1)
            self.cff = random_module(4, 3, 8, seed=1)

        def forward(self, low, high):
            return self.cff(self.reduce(low), high) * 2

    model = Fusion().eval()
    low, high = torch.randn(2, 6, 5, 9), torch.randn(2, 3, 9, 17)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(low, high), model(low, high))
        general = torch.randn(2, 3, 10, 12)
        torch.testing.assert_close(compiled(low, general), model(low, general))


# ---------------------------------------------------------------------------------------------------------------
# the module

def composition(module: CascadeFeatureFusion, low, high):
    """The unit built by hand from the module's own submodules (BatchNorm in whatever mode they are in)."""
    up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=module.align_corners)
    return torch.relu(module.bn_low(module.conv_low(up)) + module.bn_high(module.conv_high(high)))


MODULE_CASES = [(2, True), (2, False), (1, True)]  # (dilation, align_corners): shortcut, general, general


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls CascadeFeatureFusion makes to the fused op."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return cascade_feature_fusion(*args, **kwargs)

    monkeypatch.setattr(icnet_kernels.nn, "cascade_feature_fusion", spy)
    return calls


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_eval_matches_composition(backend, device, dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, backend, seed=2).to(device).eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    with torch.no_grad():
        out = module(low, high)
        assert len(fused_calls) == 1, "eval mode must take the fused op"
        exact = composition(copy.deepcopy(module).double(), low.double(), high.double())
        assert_within_budget(out, exact, composition(module, low, high), ATOL[torch.float32], "eval module")
        out2, up = module(low, high, return_upsampled=True)
    assert torch.equal(out2, out)
    assert torch.equal(up, F.interpolate(low, size=(7, 11), mode="bilinear", align_corners=align_corners))


@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_training_uses_batch_statistics(dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, seed=3).train()
    twin = copy.deepcopy(module)
    low, high = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 7, 11)
    out, up = module(low, high, return_upsampled=True)
    assert not fused_calls, "live batch statistics cannot be folded"
    torch.testing.assert_close(out, composition(twin, low, high), rtol=0, atol=0)
    assert torch.equal(up, F.interpolate(low, size=(7, 11), mode="bilinear", align_corners=align_corners))
    for key, value in module.state_dict().items():  # running statistics moved exactly as the composition's did
        torch.testing.assert_close(value, twin.state_dict()[key], rtol=0, atol=0, msg=key)
    assert module.bn_low.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dilation,align_corners", MODULE_CASES)
def test_module_frozen_batch_norm_is_fused_and_differentiable(backend, device, dilation, align_corners, fused_calls):
    module = random_module(5, 3, 6, dilation, align_corners, backend, seed=4).to(device).train()
    module.bn_low.eval()
    module.bn_high.eval()
    low, high = torch.randn(2, 5, 4, 6, device=device), torch.randn(2, 3, 7, 11, device=device)
    grad_out = torch.randn(2, 6, 7, 11, device=device)
    exact_module = copy.deepcopy(module).double()
    same_module = copy.deepcopy(module)
    running = [t.clone() for t in (module.bn_low.running_mean, module.bn_low.running_var)]

    module(low, high).backward(grad_out)
    assert len(fused_calls) == 1, "frozen BatchNorm must take the fused op"
    assert torch.equal(module.bn_low.running_mean, running[0]) and torch.equal(module.bn_low.running_var, running[1])
    composition(exact_module, low.double(), high.double()).backward(grad_out.double())
    composition(same_module, low, high).backward(grad_out)
    exact, same = dict(exact_module.named_parameters()), dict(same_module.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert_within_budget(p.grad, exact[name].grad, same[name].grad,
                             gradient_atol(exact[name].grad, torch.float32), f"grad {name}")


def test_module_state_dict_matches_plain_layers():
    module = CascadeFeatureFusion(4, 3, 8)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(module.state_dict()) == {"conv_low.weight", "conv_high.weight", *(f"bn_low.{k}" for k in bn),
                                        *(f"bn_high.{k}" for k in bn)}
    assert module.conv_low.weight.shape == (8, 4, 3, 3) and module.conv_high.weight.shape == (8, 3, 1, 1)
    assert module.conv_low.dilation == (2, 2) and module.conv_low.padding == (2, 2)
    assert module.conv_low.bias is None and module.conv_high.bias is None


# ---------------------------------------------------------------------------------------------------------------
# empty batches, NaN, bad input

@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [Geometry(0, 3, 2, 4, 3, 4, 5, 7, 2, True), Geometry(0, 3, 2, 4, 3, 4, 6, 6, 1, False)],
                         ids=["shortcut", "general"])
def test_empty_batch(backend, device, g):
    out = run_fused(backend, make_inputs(g, device=device), g)
    assert out.shape == (0, g.co, g.H, g.W)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [Geometry(1, 3, 2, 4, 5, 9, 9, 17, 2, True), Geometry(1, 3, 2, 4, 5, 9, 11, 13, 2, False),
                               Geometry(1, 3, 2, 4, 4, 5, 10, 20, 4, True)], ids=["shortcut", "general", "general-d4"])
@pytest.mark.parametrize("where", [(0, 0), (1, 1), (2, 3), (-1, -1)], ids=["corner", "next-to-corner", "inside", "last"])
def test_nan_in_low_propagates_like_the_reference(backend, device, g, where):
    """torch.relu(NaN) is NaN, and bilinear taps of weight 0 still carry a NaN: the reference's mask decides."""
    if backend == "triton" and device == "cpu":
        g = replace(g, n=2, cl=2, ch=2, co=2, h=3, w=4, H=5, W=7)  # batch 1 stays finite
    inputs = make_inputs(g, device=device, seed=6)
    inputs["low"][0, 1, where[0], where[1]] = float("nan")
    out = run_fused(backend, inputs, g)
    expected = reference(inputs, g)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())


BASE = Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True)


def bad(**edits):
    """A factory of valid inputs with the named ones replaced by edits' functions of the valid set."""
    def make():
        inputs = make_inputs(BASE)
        return {**inputs, **{k: f(inputs) for k, f in edits.items()}}
    return make


BAD_INPUTS = {  # id: (inputs, dilation, the argument the message must name)
    "weight_low-channels": (bad(weight_low=lambda t: torch.randn(4, 2, 3, 3)), 2, "weight_low"),
    "weight_low-kernel": (bad(weight_low=lambda t: torch.randn(4, 3, 1, 1)), 2, "weight_low"),
    "weight_low-rank": (bad(weight_low=lambda t: torch.randn(4, 27)), 2, "weight_low"),
    "weight_high-channels": (bad(weight_high=lambda t: torch.randn(4, 3)), 2, "weight_high"),
    "weight_high-out-channels": (bad(weight_high=lambda t: torch.randn(5, 2)), 2, "weight_high"),
    "weight_high-kernel": (bad(weight_high=lambda t: torch.randn(4, 2, 3, 3)), 2, "weight_high"),
    "high-shorter": (bad(high=lambda t: torch.randn(2, 2, 2, 7)), 2, "high"),
    "high-narrower": (bad(high=lambda t: torch.randn(2, 2, 5, 3)), 2, "high"),
    "dtype-mix": (bad(high=lambda t: t["high"].double()), 2, "high"),
    "batch-mix": (bad(high=lambda t: t["high"][:1]), 2, "high's batch"),
    "low-rank": (bad(low=lambda t: t["low"][0]), 2, "low"),
    "high-rank": (bad(high=lambda t: t["high"][:, :, :, :, None]), 2, "high"),
    "low-integer": (bad(low=lambda t: t["low"].long()), 2, "low"),
    "low-empty-map": (bad(low=lambda t: torch.randn(2, 3, 0, 4)), 2, "low"),
    "dilation-0": (bad(), 0, "dilation"),
    "dilation-negative": (bad(), -2, "dilation"),
}

FUNCTION_ONLY_BAD_INPUTS = {
    "scale_low-length": (bad(scale_low=lambda t: torch.randn(5)), 2, "scale_low"),
    "shift_low-length": (bad(shift_low=lambda t: torch.randn(3)), 2, "shift_low"),
    "scale_high-rank": (bad(scale_high=lambda t: torch.randn(4, 1)), 2, "scale_high"),
    "shift_high-length": (bad(shift_high=lambda t: torch.randn(1)), 2, "shift_high"),
    "weight_low-dtype": (bad(weight_low=lambda t: t["weight_low"].double()), 2, "weight_low"),
}


def params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("make,dilation,message", params({**BAD_INPUTS, **FUNCTION_ONLY_BAD_INPUTS}))
def test_bad_input_is_rejected_with_the_argument_named(backend, make, dilation, message):
    if backend == "native" and not icnet_kernels.native_available():
        pytest.skip("_C not built")
    with pytest.raises(ValueError, match=message):
        cascade_feature_fusion(**make(), dilation=dilation, backend=backend)


OP_ONLY_BAD_INPUTS = {  # id: (inputs, dilation, argument, bias factory or None for a valid bias)
    "bias-length": (bad(), 2, "bias", lambda t: torch.randn(5)),
    "bias-rank": (bad(), 2, "bias", lambda t: torch.randn(4, 1)),
    "bias-dtype": (bad(), 2, "bias", lambda t: torch.randn(4, dtype=torch.float64)),
    "weight_high-4d": (bad(weight_high=lambda t: t["weight_high"][:, :, None, None]), 2, "weight_high", None),
    "weight_low-dtype": (bad(weight_low=lambda t: t["weight_low"].double()), 2, "weight_low", None),
}


def raw_op_cases():
    cases = []
    if icnet_kernels.native_available():
        cases.append(pytest.param("cascade_feature_fusion", RuntimeError, id="native"))
    # The Triton launcher checks in Python; a ValueError naming the argument is as clear as TORCH_CHECK's error.
    cases.append(pytest.param("cascade_feature_fusion_triton", (RuntimeError, ValueError), id="triton"))
    return cases


@pytest.mark.parametrize("name,error", raw_op_cases())
@pytest.mark.parametrize("make,dilation,message,bias",
                         params({**{k: (*v, None) for k, v in BAD_INPUTS.items()}, **OP_ONLY_BAD_INPUTS}))
def test_op_called_directly_checks_its_arguments(name, error, make, dilation, message, bias):
    t = make()
    bias = t["shift_low"] if bias is None else bias(t)
    with pytest.raises(error, match=message):
        getattr(torch.ops.icnet, name)(t["low"], t["high"], t["weight_low"], t["weight_high"], bias, dilation, True)
