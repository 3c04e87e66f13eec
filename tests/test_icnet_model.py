"""ICNet: structure against docs/NETWORK.md, fused vs reference parity, checkpoints and the segment CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

import icnet_kernels
from icnet import ICNet
from icnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from icnet.cli import main as icnet_main
from tests.helpers import DispatchedOps

BUILD_PAIRS_NEED_NATIVE = pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")


def randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding them is exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)
    return model


def test_parameter_count_matches_the_released_model():
    count = sum(p.numel() for p in ICNet(num_classes=19, width=0.5).parameters())
    assert 6.6e6 < count < 6.8e6, count  # docs/NETWORK.md: about 6.7 M
    full = sum(p.numel() for p in ICNet(num_classes=19, width=1.0).parameters())
    assert 3.5 < full / count < 4.1  # convolution parameters scale with width squared


def test_stage_shapes_at_1025x2049():
    model = ICNet(fused=True).to("meta").eval()
    shapes = {}
    for name in ("conv3_1", "conv5_4", "sub1", "cff_sub24", "cff_sub12"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: shapes.__setitem__(name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
    logits = model(torch.empty(1, 3, 1025, 2049, device="meta"))
    assert shapes == {"conv3_1": (1, 256, 65, 129), "conv5_4": (1, 256, 33, 65), "sub1": (1, 64, 129, 257),
                      "cff_sub24": (1, 128, 65, 129), "cff_sub12": (1, 128, 129, 257)}
    assert tuple(logits.shape) == (1, 19, 1025, 2049)
    model.train()
    outs = model(torch.empty(2, 3, 1025, 2049, device="meta"))
    assert [tuple(o.shape) for o in outs] == [(2, 19, 65, 129), (2, 19, 129, 257), (2, 19, 257, 513)]


def parity(mode, size, dtype=torch.float32, channels_last=False):
    torch.manual_seed(0)
    reference = randomize_batch_norm(ICNet(mode=mode, fused=False)).eval()
    fused = ICNet(mode=mode, fused=True).eval()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, *size) * 60
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference.to(dtype)(x.to(dtype)).float()
        actual = fused.to(dtype)(x.to(dtype)).float()
    return expected, actual


@BUILD_PAIRS_NEED_NATIVE
@pytest.mark.parametrize("mode", ["sub4", "sub24", "sub124"])
@pytest.mark.parametrize("size", [(1025, 2049), (97, 161), (130, 67)], ids=["1025x2049", "97x161", "130x67"])
def test_fused_build_matches_reference_build(mode, size):
    expected, actual = parity(mode, size)
    agreement = (expected.argmax(1) == actual.argmax(1)).float().mean().item()
    assert agreement >= 0.999, agreement
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


@BUILD_PAIRS_NEED_NATIVE
def test_fused_build_parity_bfloat16_channels_last():
    expected, actual = parity("sub124", (97, 161), torch.bfloat16, channels_last=True)
    reference32, _ = parity("sub124", (97, 161))
    # bfloat16 runs of the two builds each stay near the float32 result
    scale = reference32.abs().max().item()
    assert (actual - reference32).abs().max().item() <= 2 * (expected - reference32).abs().max().item() + 0.02 * scale


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_cpu_inference_runs_its_stem_channels_last_and_returns_the_image_layout(channels_last):
    """The fused build's CPU inference convolves the large maps channels_last (a speed choice): the logits
    keep the image's layout and the reference build's values."""
    torch.manual_seed(0)
    reference = ICNet(mode="sub124", fused=False).eval()
    fused = ICNet(mode="sub124", fused=True).eval()
    fused.load_state_dict(reference.state_dict())
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = (torch.randn(1, 3, 97, 161) * 60).contiguous(memory_format=layout)
    assert fused._stem_layout(image) == torch.channels_last
    assert reference._stem_layout(image) == layout and fused.train()._stem_layout(image) == layout
    fused.eval()
    with torch.inference_mode():
        out, expected = fused(image), reference(image)
    assert out.is_contiguous(memory_format=layout) and not (channels_last and out.is_contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = randomize_batch_norm(ICNet(num_classes=5, width=0.25, mode="sub24"))
    save_checkpoint(tmp_path / "m.pt", model, class_names=list("abcde"), training_state={"epoch": 3})
    loaded, payload = load_checkpoint(tmp_path / "m.pt")
    assert (loaded.num_classes, loaded.width, loaded.mode) == (5, 0.25, "sub24")
    assert payload["training_state"] == {"epoch": 3} and payload["class_names"] == list("abcde")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other = ICNet(num_classes=19, width=0.25)
    from icnet.checkpoint import load_weights
    with pytest.raises(CheckpointError, match="num_classes"):
        load_weights(other, payload)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable ICNet checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_segment_cli_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("a", (65, 97)), ("b", (65, 97)), ("c", (40, 50))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "out"
    assert icnet_main(["segment", str(images), "--out", str(out), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "untrained" in captured.err
    assert len([line for line in captured.out.splitlines() if line.endswith(" ms")]) == 3
    for name, size in (("a", (65, 97)), ("c", (40, 50))):
        labels = np.asarray(Image.open(out / f"{name}_trainIds.png"))
        assert labels.shape == size and labels.max() < 19
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == (*size, 3)

    model = ICNet(num_classes=19, width=0.5)
    save_checkpoint(tmp_path / "w.pt", model)
    assert icnet_main(["segment", str(images / "a.png"), "--out", str(out), "--weights", str(tmp_path / "w.pt")]) == 0
    assert "untrained" not in capsys.readouterr().err
    assert icnet_main(["segment", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "no such image" in capsys.readouterr().err


def test_cuda_graph_runner_rejects_cpu_input():
    from icnet.graphs import CudaGraphRunner
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(ICNet().eval(), torch.zeros(1, 3, 65, 97))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_runner_replays_the_model():
    from icnet.graphs import CudaGraphRunner
    model = randomize_batch_norm(ICNet()).eval().cuda()
    x = torch.randn(1, 3, 97, 161, device="cuda") * 60
    runner = CudaGraphRunner(model, x)
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(runner(x).clone(), expected)
    y = torch.randn_like(x) * 60
    with torch.inference_mode():
        torch.testing.assert_close(runner(y).clone(), model(y))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_whole_model_traces_under_torch_compile(fused):
    """Both builds trace through dynamo and AOT autograd without graph breaks (the aot_eager backend keeps
    the test fast; the op-level tests cover Inductor)."""
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(fused=fused)).eval()
    x = torch.randn(1, 3, 97, 161) * 60
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,body_channels_last", [(torch.bfloat16, True), (torch.float32, False)])
def test_cpu_inference_body_layout_and_the_output_in_the_image_layout(dtype, body_channels_last):
    """bfloat16 CPU inference runs the network after its stem channels_last (where oneDNN fuses its
    residual sums); float32 keeps the image's layout there. Either way the logits come back in the image's."""
    model = ICNet(width=0.125).eval().to(dtype)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        return hook

    for name in ("conv4", "cff_sub12"):
        getattr(model, name).register_forward_hook(record(name))
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 97, 161, dtype=dtype))
    assert seen == {"conv4": body_channels_last, "cff_sub12": body_channels_last}
    assert out.is_contiguous() and out.dtype == dtype


@BUILD_PAIRS_NEED_NATIVE
@pytest.mark.parametrize("mode", ["sub4", "sub24", "sub124"])
def test_fused_cpu_inference_classifies_and_zooms_in_one_op_at_an_exact_size(mode):
    """At sizes where the head's resizes are one exact integer zoom (97x161: 8x, 16x, 32x from the maps of
    sub124, sub24, sub4) CPU inference runs the segmentation head op and no bilinear resize after the
    classifier; at an inexact size (130x67) it resizes, so the check can fail."""
    model = ICNet(mode=mode, width=0.125).eval()
    for size, exact in (((97, 161), True), ((130, 67), False)):
        with torch.inference_mode(), DispatchedOps() as recorder:
            model(torch.randn(1, 3, *size))
        assert ("segmentation_head" in recorder.names) == exact, (size, recorder.names[-6:])
        assert recorder.names[-1] == ("segmentation_head" if exact else "upsample_bilinear2d")


@BUILD_PAIRS_NEED_NATIVE
@pytest.mark.parametrize("size,exact", [((97, 161), True), ((130, 67), False)], ids=["exact", "inexact"])
def test_predict_labels_is_the_argmax_of_the_logits(size, exact):
    """At an exact size the fused CPU head writes the labels alone (no logits op runs); elsewhere the logits'
    argmax. Both equal the forward's argmax wherever its top two logits are apart."""
    torch.manual_seed(0)
    model = randomize_batch_norm(ICNet(width=0.125)).eval()
    image = torch.randn(2, 3, *size) * 60
    with torch.inference_mode(), DispatchedOps() as recorder:
        labels = model.predict_labels(image)
    with torch.inference_mode():
        logits = model(image)
    assert labels.dtype == torch.uint8 and labels.shape == (2, *size)
    assert ("segmentation_head_labels" in recorder.names) == exact and "segmentation_head" not in recorder.names
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * logits.abs().max()
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[clear], logits.argmax(1).to(torch.uint8)[clear])
    with pytest.raises(ValueError, match="eval mode"):
        model.train().predict_labels(image)
