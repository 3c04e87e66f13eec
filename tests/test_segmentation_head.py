"""Segmentation head (1x1 classifier + exact integer zoom) and its labels variant: the reference against the
other order of its two linear steps, the C++ CPU kernel and the Triton kernel against the reference on
random inputs, layouts, edge sizes, NaN, ties, opcheck and inference-only autograd."""

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import icnet_kernels
from icnet_kernels import segmentation_head, segmentation_head_labels, segmentation_head_reference
from tests.helpers import ATOL, GPU, LAYOUTS, assert_within_budget, dtypes_for, in_layout

DEVICE = "cuda" if GPU else "cpu"
Kernel = namedtuple("Kernel", "backend device")
KERNELS = [Kernel("triton", DEVICE)] + ([Kernel("native", "cpu")] if icnet_kernels.native_available() else [])


@pytest.fixture(scope="module", params=KERNELS, ids=[f"{k.backend}-{k.device}" for k in KERNELS])
def kernel(request):
    """The implementation and where it runs, named in the test id: a GPU session selects its tests by "cuda"."""
    return request.param


def make_inputs(n, k, c, h, w, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c, k, generator=g, dtype=torch.float64) / k**0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (features, weight, bias))


def classify_then_zoom(features, weight, bias, zoom):
    h, w = features.shape[-2:]
    logits = F.conv2d(features, weight[:, :, None, None], bias)
    return F.interpolate(logits, size=((h - 1) * zoom + 1, (w - 1) * zoom + 1), mode="bilinear", align_corners=True)


@settings(max_examples=20)
@given(n=st.integers(1, 2), k=st.integers(1, 12), c=st.integers(1, 8), h=st.integers(1, 6), w=st.integers(1, 6),
       zoom=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_reference_equals_classifying_before_the_zoom(n, k, c, h, w, zoom, seed):
    """Both steps are linear and the interpolation weights sum to one, so the order does not matter."""
    features, weight, bias = make_inputs(n, k, c, h, w, torch.float64, "cpu", seed)
    torch.testing.assert_close(segmentation_head_reference(features, weight, bias, zoom),
                               classify_then_zoom(features, weight, bias, zoom), rtol=1e-12, atol=1e-12)


def check_against_reference(features, weight, bias, zoom, backend, what=""):
    """Logits within the error budget of the same-precision reference; labels equal to the float64
    reference's argmax wherever its top two logits are further apart than the logits' tolerance."""
    dtype = features.dtype
    logits = segmentation_head(features, weight, bias, zoom, backend=backend)
    n, _, h, w = features.shape
    assert logits.shape == (n, weight.shape[0], (h - 1) * zoom + 1, (w - 1) * zoom + 1) and logits.dtype == dtype
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        assert logits.is_contiguous(memory_format=torch.channels_last)
    else:
        assert logits.is_contiguous()
    exact = segmentation_head_reference(features.double(), weight.double(), bias.double(), zoom)
    same_precision = segmentation_head_reference(features, weight, bias, zoom)
    assert_within_budget(logits, exact, same_precision, ATOL[dtype], what)

    labels = segmentation_head_labels(features, weight, bias, zoom, backend=backend)
    assert labels.dtype == torch.uint8 and labels.shape == (n, *logits.shape[2:])
    top2 = exact.topk(min(2, exact.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, -1] if exact.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
    # the logits' error budget B: two logits within it can swap only where their margin is under 2 B
    budget = 2 * (same_precision.double() - exact).abs().max() + ATOL[dtype]
    clear = margin > 3 * budget
    # A handful of pixels may all be near ties by chance (one pixel of three bfloat16 logits often is); on
    # larger maps a comparison that skipped most pixels would check little.
    assert clear.numel() < 32 or clear.float().mean() > 0.5, "the comparison must cover most pixels"
    expected = exact.argmax(1).to(torch.uint8)
    assert torch.equal(labels[clear], expected[clear]), f"{what}: labels differ from the reference's argmax"


@settings(max_examples=10)
@given(data=st.data())
def test_matches_reference_on_random_inputs(kernel, data):
    n = data.draw(st.integers(1, 2), label="n")
    k = data.draw(st.integers(1, 40), label="channels")
    c = data.draw(st.integers(1, 21), label="classes")
    h, w = data.draw(st.integers(1, 5), label="h"), data.draw(st.integers(1, 5), label="w")
    zoom = data.draw(st.integers(1, 9), label="zoom")
    dtype = data.draw(st.sampled_from(dtypes_for(kernel.backend, kernel.device)), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    features, weight, bias = make_inputs(n, k, c, h, w, dtype, kernel.device, data.draw(st.integers(0, 2**31 - 1)))
    check_against_reference(in_layout(features, layout), weight, bias, zoom, kernel.backend, f"{layout} {dtype}")


@pytest.mark.parametrize("n,k,c,h,w,zoom", [
    (1, 128, 19, 3, 5, 8),   # ICNet's head: 128 channels, 19 classes, the 8x zoom of sub124
    (1, 7, 3, 1, 4, 5),      # one input row: one output row
    (2, 5, 4, 4, 1, 3),      # one input column
    (1, 9, 6, 1, 1, 7),      # one pixel
    (1, 17, 33, 3, 3, 1),    # zoom 1: the classifier alone; more classes than one 32-wide block
    (1, 33, 2, 2, 9, 32),    # sub4's 32x zoom, more columns than one program's block
], ids=["icnet", "one-row", "one-column", "one-pixel", "zoom1-33-classes", "zoom32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fixed_geometries(kernel, n, k, c, h, w, zoom, layout):
    features, weight, bias = make_inputs(n, k, c, h, w, device=kernel.device, seed=3)
    check_against_reference(in_layout(features, layout), weight, bias, zoom, kernel.backend, f"{layout}")


def test_conv_weight_shape_is_accepted():
    features, weight, bias = make_inputs(1, 6, 4, 2, 3, seed=4)
    torch.testing.assert_close(segmentation_head(features, weight[:, :, None, None], bias, 3),
                               segmentation_head(features, weight, bias, 3), rtol=0, atol=0)


def test_empty_batch():
    features, weight, bias = make_inputs(0, 6, 4, 2, 3)
    assert segmentation_head(features, weight, bias, 4).shape == (0, 4, 5, 9)
    assert segmentation_head_labels(features, weight, bias, 4).shape == (0, 5, 9)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_reaches_exactly_the_outputs_that_interpolate_it(kernel, layout):
    """A NaN feature makes every class NaN where the zoom gives its pixel a non-zero weight, and nowhere else;
    the labels there are 0, torch.argmax's answer for a NaN in the first class."""
    features, weight, bias = make_inputs(1, 5, 3, 4, 5, device=kernel.device, seed=5)
    zoom, (i, j) = 4, (1, 3)
    features[0, 2, i, j] = float("nan")
    indicator = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    indicator[0, 0, i, j] = 1
    reached = segmentation_head_reference(indicator, torch.ones(1, 1, dtype=torch.float64),
                                          torch.zeros(1, dtype=torch.float64), zoom)[0, 0] > 0
    features = in_layout(features, layout)
    logits = segmentation_head(features, weight, bias, zoom, backend=kernel.backend).cpu()
    assert torch.equal(logits[0].isnan().all(0), reached) and torch.equal(logits[0].isnan().any(0), reached)
    labels = segmentation_head_labels(features, weight, bias, zoom, backend=kernel.backend).cpu()
    assert (labels[0][reached] == 0).all()
    assert torch.equal(labels[0][~reached], logits[0].argmax(0)[~reached].to(torch.uint8))


def test_labels_follow_torch_argmax_on_ties_and_nan_logits(kernel):
    features = torch.zeros(1, 2, 2, 2, device=kernel.device)
    weight = torch.zeros(5, 2, device=kernel.device)
    for bias, label in (([1.0, 5.0, 5.0, 2.0, 0.0], 1), ([1.0, 5.0, 2.0, float("nan"), float("nan")], 3),
                        ([float("-inf")] * 5, 0), ([float("nan"), 9.0, 1.0, 2.0, 3.0], 0)):
        bias = torch.tensor(bias, device=kernel.device)
        labels = segmentation_head_labels(features, weight, bias, 3, backend=kernel.backend)
        assert (labels == label).all(), f"bias {bias.tolist()}"


BAD_INPUTS = {  # id: (function arguments, the argument the message must name); every one refused by the ops too
    "features-rank": (lambda f, wt, b: (f[0], wt, b, 2), "features"),
    "features-integer": (lambda f, wt, b: (f.long(), wt, b, 2), "features"),
    "features-empty-map": (lambda f, wt, b: (f[:, :, :0], wt, b, 2), "features"),
    "weight-channels": (lambda f, wt, b: (f, wt[:, :2], b, 2), "weight"),
    "weight-rank": (lambda f, wt, b: (f, wt[None], b, 2), "weight"),
    "weight-no-classes": (lambda f, wt, b: (f, wt[:0], b[:0], 2), "weight"),
    "weight-dtype": (lambda f, wt, b: (f, wt.double(), b, 2), "weight"),
    "bias-length": (lambda f, wt, b: (f, wt, b[:2], 2), "bias"),
    "bias-rank": (lambda f, wt, b: (f, wt, b[:, None], 2), "bias"),
    "bias-dtype": (lambda f, wt, b: (f, wt, b.half(), 2), "bias"),
    "zoom-0": (lambda f, wt, b: (f, wt, b, 0), "zoom"),
    "zoom-too-large": (lambda f, wt, b: (f, wt, b, 65), "zoom"),
}
FUNCTION_ONLY = {
    "zoom-float": (lambda f, wt, b: (f, wt, b, 2.0), "zoom"),
    "zoom-bool": (lambda f, wt, b: (f, wt, b, True), "zoom"),
    "features-list": (lambda f, wt, b: (f.tolist(), wt, b, 2), "features"),
    "bias-none": (lambda f, wt, b: (f, wt, None, 2), "bias"),
}


def params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("labels", [False, True], ids=["logits", "labels"])
@pytest.mark.parametrize("backend,device", [(k.backend, k.device) for k in KERNELS] + [("reference", DEVICE)],
                         ids=[f"{k.backend}-{k.device}" for k in KERNELS] + ["reference"])
@pytest.mark.parametrize("make,message", params({**BAD_INPUTS, **FUNCTION_ONLY}))
def test_bad_input_is_rejected_with_the_argument_named(labels, backend, device, make, message):
    fn = segmentation_head_labels if labels else segmentation_head
    with pytest.raises(ValueError, match=message):
        fn(*make(*make_inputs(1, 4, 3, 2, 3, device=device)), backend=backend)


TRITON_OPS = ["segmentation_head_triton", "segmentation_head_labels_triton"]
NATIVE_OPS = ["segmentation_head", "segmentation_head_labels"] if icnet_kernels.native_available() else []
FLOAT64 = {"features-float64": (lambda f, wt, b: (f.double(), wt.double(), b.double(), 2), "features")}


@pytest.mark.parametrize("name,device,make,message",
                         [pytest.param(name, device, *case, id=f"{name}-{where}-{case_id}")
                          for name, kernel_device in [(n, DEVICE) for n in TRITON_OPS] + [(n, "cpu") for n in NATIVE_OPS]
                          for device, where in ((kernel_device, "kernel"), ("meta", "fake"))
                          for case_id, case in {**BAD_INPUTS, **(FLOAT64 if name in TRITON_OPS else {})}.items()])
def test_op_called_directly_checks_its_arguments(name, device, make, message):
    """The ops (Triton's, and the C++ one, which also takes float64) and their fake kernels (what
    torch.compile traces) reject the same input by name."""
    args = make(*make_inputs(1, 4, 3, 2, 3, device=device))
    with pytest.raises(ValueError, match=message):
        getattr(torch.ops.icnet, name)(*args)


@pytest.mark.parametrize("name", NATIVE_OPS)
def test_native_op_takes_float64(name):
    features, weight, bias = make_inputs(1, 4, 3, 2, 3, dtype=torch.float64, device="cpu")
    expected = segmentation_head_reference(features, weight, bias, 2, labels=name.endswith("labels"))
    got = getattr(torch.ops.icnet, name)(features, weight, bias, 2)
    if name.endswith("labels"):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert getattr(torch.ops.icnet, name)(features.to("meta"), weight.to("meta"), bias.to("meta"), 2).shape == got.shape


def test_labels_need_at_most_256_classes():
    features, weight, bias = make_inputs(1, 2, 257, 2, 2)
    with pytest.raises(ValueError, match="weight may have at most 256 classes"):
        segmentation_head_labels(features, weight, bias, 2)
    assert segmentation_head(features, weight, bias, 2).shape == (1, 257, 3, 3)


@pytest.mark.skipif(not GPU, reason="needs a CUDA tensor")
def test_native_backend_on_a_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="backend"):
        segmentation_head(*make_inputs(1, 4, 3, 2, 3, device="cuda"), 2, backend="native")


@pytest.mark.parametrize("name,device", [(n, DEVICE) for n in TRITON_OPS] + [(n, "cpu") for n in NATIVE_OPS])
def test_opcheck(name, device):
    features, weight, bias = make_inputs(1, 5, 3, 2, 3, device=device)
    op = getattr(torch.ops.icnet, name)
    torch.library.opcheck(op, (features, weight, bias, 3))
    torch.library.opcheck(op, (features.contiguous(memory_format=torch.channels_last), weight, bias, 2))


def test_backward_says_the_op_is_inference_only(kernel):
    features, weight, bias = make_inputs(1, 4, 3, 2, 3, device=kernel.device)
    logits = segmentation_head(features.requires_grad_(), weight, bias, 2, backend=kernel.backend)
    with pytest.raises(RuntimeError, match="inference-only"):
        logits.sum().backward()


@pytest.mark.parametrize("name", NATIVE_OPS[:1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_bfloat16_logits_round_as_torch_does(name, layout):
    """The C++ kernel rounds its float32 results to bfloat16 itself (vectorised): bit for bit torch's rounding
    of the same float32 results, halfway cases and infinities included; NaN where torch's is NaN (the NaN
    bit patterns of torch's own scalar and vector conversions differ)."""
    g = torch.Generator().manual_seed(7)
    features = (torch.randn(2, 3, 40, 50, generator=g) * 1e3).to(torch.bfloat16)
    features[0, 0, :2] = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(34)[:50].to(torch.bfloat16)
    weight = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    bias = torch.randn(5, generator=g).to(torch.bfloat16)
    features = in_layout(features, layout)
    got = torch.ops.icnet.segmentation_head(features, weight, bias, 1)
    expected = torch.ops.icnet.segmentation_head(features.float(), weight.float(), bias.float(), 1).to(torch.bfloat16)
    nan = got.isnan()
    assert nan.any() and got.isinf().any() and torch.equal(nan, expected.isnan())
    assert torch.equal(got.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
