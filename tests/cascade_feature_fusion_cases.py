"""Cascade feature fusion test cases shared by the op's test files: geometries and the kernel path each takes,
random inputs, the reference fed by name, strategies per path, the module's helpers and the error budget."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import event, strategies as st

from icnet_kernels import CascadeFeatureFusion, cascade_feature_fusion, cascade_feature_fusion_reference
from icnet_kernels.cff_geometry import exact_shortcut, tap_first
from icnet_kernels.ops.cascade_feature_fusion import fold_scale
from tests.helpers import ATOL, assert_within_budget, in_layout, record_path

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
        return exact_shortcut(self.h, self.w, self.H, self.W, self.dilation, self.align_corners)

    def path(self, backend: str, device: str) -> str:
        """The kernel path this geometry takes: the exact shortcut everywhere; otherwise, in the C++ CPU
        kernel, tap-first or blocked (csrc/cpu/cascade_feature_fusion.cpp), elsewhere the general path."""
        if self.shortcut:
            return "shortcut"
        if backend == "native" and device == "cpu":
            return "tap-first" if tap_first(self.h, self.w, self.H, self.W) else "blocked"
        return "general"


def kernel_paths(backend: str, device: str) -> tuple[str, ...]:
    return ("shortcut", "tap-first", "blocked") if (backend, device) == ("native", "cpu") else ("shortcut", "general")


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
# strategies: the path first, then a geometry that takes it, so every path gets its share of the examples

def _shortcut_spatial(draw, max_high):
    h = draw(st.integers(2, (max_high + 1) // 2))
    w = draw(st.integers(2, (max_high + 1) // 2))
    return h, w, 2 * h - 1, 2 * w - 1, 2, True


def _not_shortcut(h, w, height, width, dilation, align_corners):
    if exact_shortcut(h, w, height, width, dilation, align_corners):
        return h, w, height, width, dilation, False
    return h, w, height, width, dilation, align_corners


@st.composite
def spatial(draw, path, max_low, max_high):
    """(h, w, H, W, dilation, align_corners) taking the given kernel path. "general" is any resize but the
    shortcut: 1x1 low maps and non-2x ratios included; "tap-first" has low at most half of high's pixels,
    "blocked" more than half (its row blocks then end part-way whenever H is not a multiple of the block)."""
    if path == "shortcut":
        return _shortcut_spatial(draw, max_high)
    dilation, align_corners = draw(st.sampled_from((1, 2, 4))), draw(st.booleans())
    h = draw(st.integers(1, max_low))
    w = draw(st.integers(1, max_low))
    if path == "blocked":
        height = draw(st.integers(h, min(max_high, 2 * h - 1) if h > 1 else 1))
        width = draw(st.integers(w, max(w, min(max_high, (2 * h * w - 1) // height))))
    else:
        height = draw(st.integers(h, max_high))
        width = draw(st.integers(w, max_high))
        if path == "tap-first" and not tap_first(h, w, height, width):
            height, width = max(height, 2 * h), max(width, w)
    return _not_shortcut(h, w, height, width, dilation, align_corners)


@st.composite
def channels(draw, max_small, wide):
    """Mostly small counts (1 and odd ones included); now and then one of ICNet's 64/128 where allowed."""
    if wide and draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from((64, 128)))
    return draw(st.integers(1, max_small))


@st.composite
def geometry(draw, backend, device, wide=True):
    """A geometry on a kernel path drawn uniformly from the paths of (backend, device), recorded as a
    hypothesis event and in the run's per-path tally."""
    interpreted = backend == "triton" and device == "cpu"
    if interpreted:  # Triton's interpreter runs every program element by element in Python: keep it tiny
        max_low, max_high, max_small, wide = 5, 9, 8, False
    else:
        max_low, max_high, max_small = 12, 25, 9
    path = draw(st.sampled_from(kernel_paths(backend, device)), label="path")
    h, w, height, width, dilation, align_corners = draw(spatial(path, max_low, max_high))
    g = Geometry(draw(st.integers(1, 2)), draw(channels(max_small, wide)), draw(channels(max_small, wide)),
                 draw(channels(max_small, wide)), h, w, height, width, dilation, align_corners)
    assert g.path(backend, device) == path, (g, path)
    event(f"path: {path}")
    record_path(f"cascade_feature_fusion {backend}-{device}", path)
    return g


def lay_out(inputs, low_layout, high_layout):
    return {**inputs, "low": in_layout(inputs["low"], low_layout), "high": in_layout(inputs["high"], high_layout)}


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


def scale_gradient_atol(inputs64, grad_out, g: Geometry, name: str, dtype: torch.dtype) -> float:
    """The budget of a BatchNorm scale's gradient beyond gradient_atol: the op folds the scale into its weight,
    so the scale's gradient sum_k w[co, k] * G[co, k] takes the folded weight's gradient G rounded to dtype, one
    rounding of up to half an ulp per element, each weighed by |w|. G sums over every pixel and is far larger
    than the scale's gradient it makes up."""
    side = name.removeprefix("scale_")
    folded = {**inputs64, f"weight_{side}": fold_scale(inputs64[f"weight_{side}"], inputs64[name]),
              name: torch.ones_like(inputs64[name])}
    folded_grad = gradients(lambda t: reference(t, g), folded, grad_out)[f"weight_{side}"]
    co = folded_grad.shape[0]
    weight = inputs64[f"weight_{side}"].reshape(co, -1).abs()
    return (torch.finfo(dtype).eps / 2 * (weight * folded_grad.reshape(co, -1).abs()).sum(1)).max().item()


def gradients(fn, inputs, grad_out):
    """d(fn(inputs) . grad_out) / d(each input). fn lays the leaves out itself, so that a strided view stays
    strided (a clone of one would not)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    return dict(zip(INPUT_NAMES, torch.autograd.grad(fn(leaves), [leaves[k] for k in INPUT_NAMES], grad_out)))


# ---------------------------------------------------------------------------------------------------------------
# the module and bad input

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


def composition(module: CascadeFeatureFusion, low, high):
    """The unit built by hand from the module's own submodules (BatchNorm in whatever mode they are in)."""
    up = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=module.align_corners)
    return torch.relu(module.bn_low(module.conv_low(up)) + module.bn_high(module.conv_high(high)))


MODULE_CASES = [(2, True), (2, False), (1, True)]  # (dilation, align_corners): shortcut, general, general


BASE = Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True)


def bad(**edits):
    """A factory of valid inputs with the named ones replaced by edits' functions of the valid set."""
    def make():
        inputs = make_inputs(BASE)
        return {**inputs, **{k: f(inputs) for k, f in edits.items()}}
    return make


