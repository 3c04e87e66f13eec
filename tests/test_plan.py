"""The inference plan's CPU twin against the reference build, and the exact geometry it relies on: strided
shrinks equal to Caffe's shrink-2, and the head's two resizes equal to one integer zoom."""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import icnet_kernels
from benchmarks import e2e_plan
from icnet import ICNet
from icnet.graphs import weights_version
from icnet.layers import caffe_resize
from icnet.plan import InferencePlan, conv_on_the_unshrunk_map, exact_head_zoom, shrink2
from tests.helpers import LAYOUTS, DispatchedOps, in_layout
from tests.test_icnet_model import randomize_batch_norm

pytestmark = pytest.mark.skipif(not icnet_kernels.native_available(), reason="the plan runs the native CPU ops")

EXACT = (65, 129)    # 1025x2049 / 16: every shrink, fusion unit and the head's 8x zoom exact
INEXACT = (50, 70)   # even sides: resizes everywhere


@settings(max_examples=25)
@given(h=st.integers(1, 12), w=st.integers(1, 12), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_shrink2_equals_caffe_shrink_exactly(h, w, layout, dtype, seed):
    x = in_layout(torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype), layout)
    expected = caffe_resize(x, shrink=2)
    actual = shrink2(x)
    assert actual.shape == expected.shape and torch.equal(actual, expected)


@settings(max_examples=40)
@given(f=st.tuples(st.integers(1, 6), st.integers(1, 6)), s=st.tuples(st.integers(1, 20), st.integers(1, 20)),
       i=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_exact_head_zoom_is_one_resize_exactly_when_it_says_so(f, s, i):
    x = torch.randn(1, 2, *f, dtype=torch.float64)
    zoom = exact_head_zoom(f, s, i)
    if zoom is None:
        return
    torch.testing.assert_close(caffe_resize(caffe_resize(x, size=s), size=i), caffe_resize(x, zoom=zoom),
                               rtol=1e-12, atol=1e-12)


def test_exact_head_zoom_finds_icnets_heads():
    assert exact_head_zoom((129, 257), (257, 513), (1025, 2049)) == 8     # sub124
    assert exact_head_zoom((65, 129), (129, 257), (1025, 2049)) == 16     # sub24
    assert exact_head_zoom((33, 65), (65, 129), (1025, 2049)) == 32       # sub4
    assert exact_head_zoom((9, 17), (17, 33), (66, 129)) is None          # image side not (h-1)*z+1
    assert exact_head_zoom((9, 17), (16, 33), (65, 129)) is None          # the intermediate resize loses samples


def reference_model(mode, seed=0):
    torch.manual_seed(seed)
    return randomize_batch_norm(ICNet(mode=mode, fused=False), seed).eval()


@functools.cache
def built(mode, size, layout="contiguous", seed=0):
    """(image, the reference build's logits, the logits plan, the labels plan), shared by the tests: the
    interpreted head makes each plan take seconds."""
    model = reference_model(mode, seed)
    image = in_layout(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed)) * 60, layout)
    with torch.no_grad():
        expected = model(image)
    return image, expected, InferencePlan(model, image), InferencePlan(model, image, labels=True)


def check_plan(mode, size, layout="contiguous", seed=0):
    image, expected, plan, labels_plan = built(mode, size, layout, seed)
    logits = plan(image)
    assert logits.shape == expected.shape and logits.dtype == expected.dtype
    assert logits.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                else torch.contiguous_format)
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    labels = labels_plan(image)
    assert labels.dtype == torch.uint8 and labels.shape == (1, *size)
    top2 = expected.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-3 * expected.abs().max().item()
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[clear], expected.argmax(1)[clear].to(torch.uint8))
    assert (labels == expected.argmax(1)).float().mean() >= 0.998


@pytest.mark.parametrize("mode", ["sub124", "sub24", "sub4"])
def test_plan_matches_the_reference_build_at_an_exact_size(mode):
    check_plan(mode, EXACT)


@pytest.mark.parametrize("mode,size,layout", [("sub124", EXACT, "channels_last"), ("sub124", INEXACT, "contiguous"),
                                              ("sub24", INEXACT, "channels_last")],
                         ids=["exact-channels_last", "inexact", "inexact-sub24-channels_last"])
def test_plan_matches_the_reference_build(mode, size, layout):
    check_plan(mode, size, layout, seed=1)



@pytest.mark.parametrize("choices", [None, "triton"], ids=["cpu-choices", "gpu-like-triton"])
def test_a_float16_channels_last_plan_matches_the_float64_reference(choices):
    """The GPU goals' dtype and layout on the CPU, with the CPU's choices, and with the Triton kernels a GPU
    plan runs (interpreted): pyramid pooling folded into conv5_4, a fusion unit's shortcut, a dilated 3x3
    and a bottleneck's increase with its residual (the interpreter makes more take minutes). bfloat16 only
    on a GPU: the interpreter's bfloat16 dot products are wrong."""
    torch.manual_seed(2)  # a quarter of the channels: the interpreted kernels take seconds, not minutes
    model = randomize_batch_norm(ICNet(mode="sub124", fused=False, width=0.25), 2).eval()
    image = torch.randn(1, 3, *EXACT, generator=torch.Generator().manual_seed(2)) * 60
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
    x = image.half().contiguous(memory_format=torch.channels_last)
    if choices == "triton":
        choices = {"ppm": "fold", "cff_sub24": "triton", "conv4.1.conv3x3": "triton", "conv5.2.increase": "triton"}
    plan = InferencePlan(model, x, choices=choices)
    with DispatchedOps() as recorder:
        logits = plan(x)
    if choices:
        assert recorder.names.count("conv2d_epilogue_triton") == 2
        assert recorder.names.count("cascade_feature_fusion_triton") == 1 and "pyramid_pool_sum" not in recorder.names
    assert logits.dtype == torch.float16 and logits.is_contiguous(memory_format=torch.channels_last)
    assert (logits.double() - exact).abs().max().item() <= 0.05 * exact.abs().max().item()
    assert (logits.argmax(1) == exact.argmax(1)).float().mean() >= 0.99
    if not choices:  # the labels head is the same in both
        labels = InferencePlan(model, x, labels=True)(x)
        assert labels.dtype == torch.uint8 and (labels == exact.argmax(1)).float().mean() >= 0.99

def ops_of_a_call(plan, image):
    with DispatchedOps() as recorder:
        plan(image)
    return recorder.names


def test_a_call_at_an_exact_size_folds_nothing_and_resizes_nothing():
    """BatchNorm is folded at build time, the shrinks are strided reads, the head is one kernel and max
    pooling keeps no indices: a call runs no normalisation arithmetic, no bilinear resize and no ATen max
    pooling. The same count at an inexact size sees the
    resizes, so the check can fail."""
    image, _, plan, _ = built("sub124", EXACT)
    names = ops_of_a_call(plan, image)
    assert "segmentation_head_triton" in names and "max_pool_triton" in names
    assert not {"upsample_bilinear2d", "rsqrt", "batch_norm", "native_batch_norm", "max_pool2d",
                "max_pool2d_with_indices"} & set(names), sorted(set(names))
    image, _, plan, _ = built("sub124", INEXACT, seed=1)
    assert "upsample_bilinear2d" in ops_of_a_call(plan, image)


def test_labels_plan_never_computes_logits():
    image, _, _, labels_plan = built("sub124", EXACT)
    names = ops_of_a_call(labels_plan, image)
    assert "segmentation_head_labels_triton" in names and "segmentation_head_triton" not in names
    assert "argmax" not in names


def test_plan_refuses_other_inputs_by_name():
    image, _, plan, _ = built("sub124", INEXACT, seed=1)
    for other in (torch.randn(1, 3, 52, 70), image.double(), image.contiguous(memory_format=torch.channels_last),
                  image.numpy()):
        with pytest.raises(ValueError, match="image"):
            plan(other)


def test_plan_refuses_bad_builds_by_name():
    model = reference_model("sub4")
    with pytest.raises(ValueError, match="eval mode"):
        InferencePlan(model.train(), torch.randn(1, 3, *INEXACT))
    model.eval()
    with pytest.raises(ValueError, match="example"):
        InferencePlan(model, torch.randn(3, *INEXACT))
    with pytest.raises(ValueError, match="cuda_graph"):
        InferencePlan(model, torch.randn(1, 3, *INEXACT), cuda_graph=True)
    with pytest.raises(ValueError, match="concurrent"):
        InferencePlan(model, torch.randn(1, 3, *INEXACT), concurrent=True)
    with pytest.raises(ValueError, match="model"):
        InferencePlan(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, *INEXACT))


def test_without_triton_the_head_classifies_first_and_zooms_in_aten(monkeypatch):
    """Where Triton cannot run (a CPU without the interpreter) the exact head is ATen's classifier on the
    small map and one zoom: the same values as the reference build."""
    image, expected, plan, labels_plan = built("sub124", EXACT)
    monkeypatch.setattr("icnet.plan.triton_usable", lambda device: False)
    names = ops_of_a_call(plan, image)
    assert "segmentation_head_triton" not in names and names.count("upsample_bilinear2d") == 1
    torch.testing.assert_close(plan(image), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    assert (labels_plan(image) == expected.argmax(1)).float().mean() >= 0.998


def test_benchmark_runner_builds_under_inference_mode():
    """The end-to-end benchmark builds its runners under torch.inference_mode: the plan's tensors must stay
    ordinary ones, whose version counters a CUDA graph runner reads."""
    model = reference_model("sub4")
    image = torch.randn(1, 3, *INEXACT)
    with torch.inference_mode():
        plan = e2e_plan.plan_runner(labels=True)(model, image)
        labels = plan(image)
    assert weights_version(list(plan.network.modules()))
    with torch.no_grad():
        expected = model(image).argmax(1)
    assert labels.dtype == torch.uint8 and (e2e_plan.predicted_labels(labels) == expected).float().mean() >= 0.998
    assert torch.equal(e2e_plan.predicted_labels(model(image)), model(image).argmax(1))


@settings(max_examples=25)
@given(h=st.integers(1, 8), w=st.integers(1, 8), k=st.sampled_from([1, 3]), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_a_conv_of_the_strided_shrink_is_a_conv_of_the_map(h, w, k, stride, dilation, seed):
    """conv(x[::2, ::2]) with stride s, dilation d, padding p equals conv(x) with 2s, 2d, 2p on odd sides
    (float64: the same products, summed in another order)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2 * h - 1, 2 * w - 1, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 4, k, stride, dilation * (k // 2), dilation).double()
    unshrunk = conv_on_the_unshrunk_map(conv)
    expected = conv(caffe_resize(x, shrink=2))
    actual = torch.nn.functional.conv2d(x, conv.weight, conv.bias, unshrunk.stride, unshrunk.padding,
                                        unshrunk.dilation)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_the_plan_never_makes_the_half_resolution_image():
    """At odd sizes conv1_1 reads the image: no op of a call makes a 3-channel map of half the image's size."""
    image, _, plan, _ = built("sub124", EXACT)
    half = ((EXACT[0] + 1) // 2, (EXACT[1] + 1) // 2)
    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Shapes():
        plan(image)
    assert (1, 3, *half) not in shapes and (1, 32, (half[0] + 1) // 2, (half[1] + 1) // 2) in shapes


def test_backend_reaches_the_pooling_and_the_fusion_units():
    image, expected, plan, _ = built("sub124", INEXACT, seed=1)
    assert {"cascade_feature_fusion", "pyramid_pool_sum"} <= set(ops_of_a_call(plan, image))
    model = reference_model("sub124", seed=1)
    composed = InferencePlan(model, image, backend="reference")
    assert not {"cascade_feature_fusion", "pyramid_pool_sum"} & set(ops_of_a_call(composed, image))
    torch.testing.assert_close(composed(image), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_tuning_keeps_the_fastest_measured_backend_of_each_layer():
    image, expected, _, _ = built("sub124", INEXACT, seed=1)
    plan = InferencePlan(reference_model("sub124", seed=1), image, tune=True)
    assert set(plan.timings) == {"ppm", "cff_sub24", "cff_sub12"}
    assert e2e_plan.row_fields(plan) == {"plan_choices": plan.choices, "plan_timings_ms": plan.timings}
    assert e2e_plan.row_fields(lambda x: x) == {}
    for layer, times in plan.timings.items():
        assert set(times) == {"native", "reference"} and all(ms > 0 for ms in times.values())  # no Triton on a CPU
        assert plan.choices[layer] == min(times, key=times.get)
    torch.testing.assert_close(plan(image), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_choices_from_a_results_file_are_used_as_given():
    image, expected, _, _ = built("sub124", INEXACT, seed=1)
    model = reference_model("sub124", seed=1)
    choices = {"ppm": "reference", "cff_sub24": "native", "cff_sub12": "reference"}
    plan = InferencePlan(model, image, choices=choices)
    assert {layer: plan.choices[layer] for layer in choices} == choices and plan.timings is None
    names = ops_of_a_call(plan, image)
    assert names.count("cascade_feature_fusion") == 1 and "pyramid_pool_sum" not in names
    torch.testing.assert_close(plan(image), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    sub4 = InferencePlan(reference_model("sub4"), image).choices
    assert sub4.pop("ppm") is None and sub4 and set(sub4.values()) == {"library"}
    for bad in ({"cff_sub13": "native"}, {"ppm": "cudnn"}, {"conv4.0.reduce": "native"}):
        with pytest.raises(ValueError, match="choices"):
            InferencePlan(model, image, choices=bad)
    with pytest.raises(ValueError, match="choices"):
        InferencePlan(model, image, tune=True, choices=choices)


def test_convolutions_chosen_for_triton_run_its_implicit_gemm():
    """The Triton convolution in the plan's CPU twin (interpreted): conv1_1 on the image itself (stride 4,
    dilation 2), a dilated 3x3, and a bottleneck's increase with its residual and ReLU."""
    image, expected, _, _ = built("sub124", EXACT)
    chosen = ["conv1.0", "conv4.1.conv3x3", "conv3_rest.2.increase"]
    plan = InferencePlan(reference_model("sub124"), image, choices=dict.fromkeys(chosen, "triton"))
    with DispatchedOps() as recorder:  # one interpreted call, which takes seconds, both counted and compared
        logits = plan(image)
    assert recorder.names.count("conv2d_epilogue_triton") == len(chosen)
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
