"""ICNet's ConvBN in inference: the fused epilogues, their fallback to the plain path, the float32 fold."""

import numpy as np
import pytest
import torch
from PIL import Image

from icnet import ICNet, layers
from icnet.cli import main as icnet_main
from icnet.layers import ConvBN, epilogue_fallbacks, fused_epilogue
from tests.test_icnet_model import BUILD_PAIRS_NEED_NATIVE, randomize_batch_norm


def builds(mode="sub124", dtype=torch.float32):
    torch.manual_seed(0)
    reference = randomize_batch_norm(ICNet(mode=mode, fused=False)).eval()
    fused = ICNet(mode=mode, fused=True).eval()
    fused.load_state_dict(reference.state_dict())
    return reference.to(dtype), fused.to(dtype)


@BUILD_PAIRS_NEED_NATIVE
def test_bfloat16_model_runs_on_an_nchw_image():
    """oneDNN fuses a residual only channels_last: elsewhere torch's stand-in has no bfloat16 kernel, so the
    bottlenecks of a bfloat16 model on an NCHW image take the plain path."""
    reference32, _ = builds()
    _, fused = builds(dtype=torch.bfloat16)
    x = torch.randn(1, 3, 65, 97) * 60
    with torch.inference_mode():
        exact = reference32(x)
        out = fused(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert (out.float() - exact).abs().max().item() <= 0.05 * exact.abs().max().item()
    assert epilogue_fallbacks(fused) == {}  # chosen up front, not by a failing call


def test_segment_command_runs_in_bfloat16(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    assert icnet_main(["segment", str(image), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "a_trainIds.png")).shape == (40, 50)


@BUILD_PAIRS_NEED_NATIVE
def test_a_failing_fused_epilogue_falls_back_once_per_module(monkeypatch):
    calls = []

    def no_engine(*args):
        calls.append(args)
        raise RuntimeError("no engine for this shape\nsecond line")

    monkeypatch.setattr(layers, "_onednn_conv_post_ops", no_engine)
    reference, fused = builds()
    x = torch.randn(1, 3, 65, 97) * 60
    convs = [name for name, module in fused.named_modules() if isinstance(module, ConvBN)]
    with torch.inference_mode():
        expected = reference(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
        assert len(calls) == len(convs)  # each module tried once
        fused(x)
    assert len(calls) == len(convs)  # and remembered
    assert epilogue_fallbacks(fused) == dict.fromkeys(convs, "no_engine: no engine for this shape")


def test_a_bad_input_raises_and_is_not_taken_for_a_missing_fused_implementation():
    conv = ConvBN(3, 8, 3, fused=True).eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="channels"):
        conv(torch.randn(1, 4, 9, 9))
    assert conv.epilogue_fallback is None


@pytest.mark.parametrize("bfloat16_cpu", [True, False], ids=["onednn-bfloat16", "no-onednn-bfloat16"])
def test_epilogue_choice(monkeypatch, bfloat16_cpu):
    """bfloat16_cpu: whether this CPU has oneDNN's bfloat16 convolution (AVX-512 or AVX-NE-CONVERT)."""
    monkeypatch.setattr(layers, "onednn_bfloat16_supported", lambda: bfloat16_cpu)
    onednn = torch.backends.mkldnn.is_available()
    cpu = layers._onednn_conv_post_ops if onednn else None
    cpu_bfloat16 = cpu if bfloat16_cpu else None
    nhwc, nchw = (lambda: True), (lambda: False)
    assert fused_epilogue("cpu", torch.float32, nchw, True, True) is cpu
    assert fused_epilogue("cpu", torch.bfloat16, nhwc, True, True) is cpu_bfloat16
    assert fused_epilogue("cpu", torch.bfloat16, nchw, True, False) is cpu_bfloat16
    assert fused_epilogue("cpu", torch.bfloat16, nchw, True, True) is None
    assert fused_epilogue("cpu", torch.float64, nhwc, True, True) is None
    # On a GPU only a convolution summed with a residual runs fused, and never in bfloat16.
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        assert fused_epilogue("cuda", dtype, nhwc, True, False) is None
        assert fused_epilogue("cuda", dtype, nhwc, False, True) is None
    cudnn = torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    assert fused_epilogue("cuda", torch.float16, nhwc, True, True) is (layers._cudnn_conv_add_relu if cudnn else None)
    assert fused_epilogue("cuda", torch.bfloat16, nhwc, True, True) is None


def test_a_half_precision_model_folds_batch_norm_in_float32():
    """The folded weight and bias of a float16 ConvBN are the exact fold rounded once to float16."""
    torch.manual_seed(0)
    conv = ConvBN(64, 64, 3, fused=True)
    conv.bn.running_var.uniform_(1e-4, 2.0)
    conv.bn.running_mean.normal_(0, 1)
    conv.bn.weight.data.uniform_(0.5, 1.5)
    conv.bn.bias.data.normal_(0, 0.1)
    conv = conv.eval().half()
    bn = conv.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact = {"weight": conv.conv.weight.double() * scale.reshape(-1, 1, 1, 1),
             "bias": bn.bias.double() - bn.running_mean.double() * scale}
    with torch.inference_mode():
        folded = dict(zip(("weight", "bias"), conv._folded_params(torch.float16)))
    for name, value in folded.items():
        assert value.dtype == torch.float16
        rounded_once = (exact[name].half().double() - exact[name]).abs()
        error = (value.double() - exact[name]).abs()
        assert (error <= rounded_once + 1e-6 * exact[name].abs()).all(), name


def test_the_fold_follows_a_change_of_dtype_and_of_a_statistic():
    conv = ConvBN(4, 6, 3, fused=True).eval()
    with torch.inference_mode():
        weight32, _ = conv._folded_params(torch.float32)
        weight16, _ = conv._folded_params(torch.float16)
        assert weight16.dtype == torch.float16 and weight32.dtype == torch.float32
        conv.bn.running_var.mul_(4)
        halved, _ = conv._folded_params(torch.float32)
    torch.testing.assert_close(halved, weight32 / 2)
