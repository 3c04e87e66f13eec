"""Converting the released Caffe ICNet: a caffemodel written here with the released layer names, shapes and
random blobs converts, and the converted model computes what the released graph computes (evaluated by the
interpreter in caffe_helpers), for both released variants; bad files fail with clear errors."""

import numpy as np
import pytest
import torch

from icnet.caffe import CaffeModelError
from icnet.checkpoint import load_checkpoint, preprocessing_of, read_checkpoint
from icnet.cli import main as icnet_main
from icnet.cityscapes import CLASS_NAMES
from icnet.convert import convert, convert_caffemodel, released_convolutions
from icnet.model import ICNet
from icnet.preprocessing import RELEASED_PREPROCESSING
from tests.caffe_helpers import Layer, encode_net, released_graph, run_graph

# 161x353 makes every Caffe resize exact and gives conv5_3 a 6x12 map, on which the pyramid pooling's
# adaptive windows are Caffe kernels (kernel = stride = size / bin); the released 33x65 map needs 1025x2049.
SMALL_INPUT, SMALL_MAP = (161, 353), (6, 12)
VARIANTS = ("bnnomerge", "merged")


def write(tmp_path, layers, name="icnet.caffemodel", **options):
    path = tmp_path / name
    path.write_bytes(encode_net(layers, **options))
    return path


@pytest.fixture(scope="module")
def graphs():
    return {variant: released_graph(np.random.default_rng(i), merged=variant == "merged", map_size=SMALL_MAP)
            for i, variant in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def caffemodels(graphs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    return {variant: write(folder, layers, f"{variant}.caffemodel") for variant, layers in graphs.items()}


@pytest.fixture(scope="module")
def converted(caffemodels):
    """variant -> (state_dict, report) of its conversion."""
    results = {}
    for variant, path in caffemodels.items():
        model, report = convert_caffemodel(path)
        results[variant] = (model.state_dict(), report)
    return results


def built(state_dict, fused=True, dtype=torch.float64):
    model = ICNet(num_classes=19, fused=fused).eval()
    model.load_state_dict(state_dict)
    return model.to(dtype)


def image(size, seed=0, dtype=torch.float64):
    """A preprocessed input (BGR, means subtracted): values of the size the released model sees."""
    return (torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed)) * 60).to(dtype)


def assert_close(actual, expected, relative):
    error = (actual - expected).abs().max().item()
    assert error <= relative * expected.abs().max().item(), (error, expected.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_the_converted_model_computes_the_released_graph(graphs, converted, variant, fused):
    state_dict, report = converted[variant]
    assert report.variant == variant
    model = built(state_dict, fused)
    x = image(SMALL_INPUT)
    expected = run_graph(graphs[variant], x)["conv6_interp"]
    with torch.inference_mode():
        actual = model(x)
    assert actual.shape == expected.shape == (1, 19, *SMALL_INPUT)
    assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_inference_of_the_converted_model_matches_the_graph(graphs, converted, variant):
    model = built(converted[variant][0], dtype=torch.float32)
    x = image(SMALL_INPUT, seed=1)
    expected = run_graph(graphs[variant], x)["conv6_interp"]
    with torch.inference_mode():
        actual = model(x.float())
    assert_close(actual.double(), expected, 1e-3)
    assert (actual.argmax(1) == expected.argmax(1)).float().mean() > 0.99


def test_the_released_geometry_at_the_released_input_size(tmp_path):
    """At 1025x2049 conv5_3 is 33x65 and the released pooling kernels and strides apply."""
    layers = released_graph(np.random.default_rng(7), merged=False)
    model, _ = convert_caffemodel(write(tmp_path, layers))
    x = image((1025, 2049), seed=2, dtype=torch.float32)
    blobs = run_graph(layers, x)
    assert blobs["conv5_3"].shape[-2:] == (33, 65)
    with torch.inference_mode():
        actual = model(x)
    assert_close(actual, blobs["conv6_interp"], 1e-3)


def test_the_comparison_notices_a_wrong_bn_blob_order(graphs, tmp_path):
    """The check above can fail: the same file with one BN layer's slope and bias swapped converts (the
    shapes fit) into a model that the original graph does not match."""
    layers = [Layer(l.name, l.type, l.bottoms, l.tops, l.params, list(l.blobs)) for l in graphs["bnnomerge"]]
    bn = next(l for l in layers if l.name == "conv4_3_1x1_increase/bn")
    bn.blobs[0], bn.blobs[1] = bn.blobs[1], bn.blobs[0]
    model, _ = convert_caffemodel(write(tmp_path, layers))
    model = model.double()
    x = image(SMALL_INPUT)
    expected = run_graph(graphs["bnnomerge"], x)["conv6_interp"]
    with torch.inference_mode():
        actual = model(x)
    error = (actual - expected).abs().max().item()
    assert error > 1e-2 * expected.abs().max().item()


def test_every_parameter_but_the_training_classifiers_comes_from_the_caffemodel(converted):
    model = ICNet(num_classes=19)
    for variant in VARIANTS:
        _, report = converted[variant]
        assert sorted(report.untrained) == ["cls_sub24.bias", "cls_sub24.weight", "cls_sub4.bias", "cls_sub4.weight"]
        mapped = [key for _, keys in report.mapped for key in keys]
        assert len(mapped) == len(set(mapped))  # one to one
        assert len(released_convolutions(model)) == 64
        layers = [name for name, _ in report.mapped]
        assert len(layers) == (64 + 63 if variant == "bnnomerge" else 64)
        assert report.input_scale is not None and len(report.input_scale) == 3
        assert "64 convolutions" in report.summary() and "cls_sub4" in report.summary()


def test_convert_writes_a_checkpoint_with_the_released_preprocessing(caffemodels, converted, tmp_path, capsys):
    out = tmp_path / "icnet.pt"
    assert icnet_main(["convert", str(caffemodels["bnnomerge"]), "--out", str(out), "--verbose"]) == 0
    stdout = capsys.readouterr().out
    assert "bnnomerge" in stdout and "63 BN layers" in stdout and str(out) in stdout
    assert "conv_sub4 -> cff_sub24.conv_low.weight" in stdout
    assert "conv_sub4/bn -> cff_sub24.bn_low.weight, cff_sub24.bn_low.bias" in stdout
    payload = read_checkpoint(out)
    assert payload["class_names"] == list(CLASS_NAMES)
    assert preprocessing_of(payload) == RELEASED_PREPROCESSING
    model, _ = load_checkpoint(out)
    for key, value in converted["bnnomerge"][0].items():
        if not key.startswith(("cls_sub4.", "cls_sub24.")):
            assert torch.equal(model.state_dict()[key], value), key


def test_legacy_v1_layers_and_blob_encodings_convert_alike(graphs, caffemodels, converted, tmp_path):
    """The same weights stored with legacy 4-D blob dims and unpacked floats, and (for the layer types V1
    knows) in the legacy V1 layer list, give the same model."""
    convs = [l for l in graphs["merged"] if l.type == "Convolution"]  # V1 has no Scale layer
    legacy = write(tmp_path, graphs["merged"], "legacy.caffemodel", legacy_shape=True)
    new = convert_caffemodel(write(tmp_path, convs, "new.caffemodel"))[0].state_dict()
    pairs = [(converted["merged"][0], legacy), (new, write(tmp_path, convs, "v1.caffemodel", v1=True))]
    for expected, other in pairs:
        actual = convert_caffemodel(other)[0].state_dict()
        for key, value in expected.items():
            if not key.startswith(("cls_sub4.", "cls_sub24.")):
                assert torch.equal(actual[key], value), (other.name, key)


# --- errors ---------------------------------------------------------------------------------------------

def without(layers, name):
    return [layer for layer in layers if layer.name != name]


def test_a_missing_layer_is_named(graphs, tmp_path):
    with pytest.raises(CaffeModelError, match="conv4_2_3x3"):
        convert_caffemodel(write(tmp_path, without(graphs["merged"], "conv4_2_3x3")))
    with pytest.raises(CaffeModelError, match="conv_sub2/bn"):
        convert_caffemodel(write(tmp_path, without(graphs["bnnomerge"], "conv_sub2/bn")))
    with pytest.raises(CaffeModelError, match="conv6_cls"):
        convert_caffemodel(write(tmp_path, without(graphs["merged"], "conv6_cls")))


def test_an_extra_layer_is_named_unless_allowed(graphs, tmp_path, capsys):
    extra = Layer("conv6_sub4", "Convolution", ["conv5_4_interp"], ["conv6_sub4"], {},
                  [np.zeros((19, 256, 1, 1), np.float32), np.zeros(19, np.float32)])
    path = write(tmp_path, graphs["merged"] + [extra])
    with pytest.raises(CaffeModelError, match="conv6_sub4"):
        convert_caffemodel(path)
    _, report = convert_caffemodel(path, allow_extra=True)
    assert report.ignored == ["conv6_sub4"] and "conv6_sub4" in report.summary()
    assert icnet_main(["convert", str(path), "--out", str(tmp_path / "a.pt")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icnet: ") and "conv6_sub4" in lines[0]
    assert not (tmp_path / "a.pt").exists()
    assert icnet_main(["convert", str(path), "--out", str(tmp_path / "a.pt"), "--ignore-extra-layers"]) == 0


@pytest.mark.parametrize("damage", ["weight shape", "bn channels", "bn blob count", "missing bias", "type"])
def test_a_blob_of_the_wrong_shape_or_number_is_named(graphs, tmp_path, damage):
    variant = "merged" if damage == "missing bias" else "bnnomerge"
    layers = [Layer(l.name, l.type, l.bottoms, l.tops, l.params, list(l.blobs)) for l in graphs[variant]]
    target = {"weight shape": "conv3_2_3x3", "bn channels": "conv5_4_k1/bn", "bn blob count": "conv2_1_3x3/bn",
              "missing bias": "conv1_sub1", "type": "conv_sub4"}[damage]
    layer = next(l for l in layers if l.name == target)
    if damage == "weight shape":
        layer.blobs[0] = layer.blobs[0][:, :, :1, :1].copy()
        match = r"conv3_2_3x3.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"
    elif damage == "bn channels":
        layer.blobs[1] = layer.blobs[1][:, :128].copy()
        match = "conv5_4_k1/bn.*256"
    elif damage == "bn blob count":
        layer.blobs = layer.blobs[:3]
        match = "conv2_1_3x3/bn.*3 blob"
    elif damage == "missing bias":
        layer.blobs = layer.blobs[:1]
        match = "conv1_sub1.*1 blob"
    else:
        layer.type = "Deconvolution"
        match = "conv_sub4.*Deconvolution"
    with pytest.raises(CaffeModelError, match=match):
        convert_caffemodel(write(tmp_path, layers))


def test_convert_reports_a_file_that_is_not_a_caffemodel_in_one_line(tmp_path, capsys, caffemodels):
    checkpoint = tmp_path / "icnet.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, checkpoint)
    truncated = tmp_path / "cut.caffemodel"
    truncated.write_bytes(caffemodels["merged"].read_bytes()[:100_000])
    for path in (checkpoint, truncated, tmp_path / "absent.caffemodel"):
        assert icnet_main(["convert", str(path), "--out", str(tmp_path / "out.pt")]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("icnet: ") and path.name in lines[0], lines
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(CaffeModelError, match="not a caffemodel"):
        convert(checkpoint, tmp_path / "out.pt")
