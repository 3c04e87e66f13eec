"""The ONNX export against the reference build: ONNX Runtime runs the exported graph on random weights and
random images, at fixed and at dynamic batch and sizes, and its logits must match the PyTorch reference's."""

import copy
import json

import numpy as np
import pytest
import torch

import icnet.model
from icnet import ICNet
from icnet.checkpoint import save_checkpoint
from icnet.cityscapes import CLASS_NAMES
from icnet.cli import main
from icnet.export import MIN_DYNAMIC_SIDE, export_onnx
from icnet.preprocessing import DEFAULT_PREPROCESSING

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# A narrow ICNet keeps the exports and the 1025x2049 run quick; the graph's structure is the released one's.
WIDTH = 0.125


def random_icnet(mode: str, fused: bool, seed: int = 0) -> ICNet:
    torch.manual_seed(seed)
    model = ICNet(mode=mode, width=WIDTH, fused=fused).eval()
    for module in model.modules():  # non-trivial statistics, so the BatchNorm the export folds matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model


def reference_of(model: ICNet) -> ICNet:
    reference = ICNet(mode=model.mode, width=WIDTH, fused=False).eval()
    reference.load_state_dict(model.state_dict())
    return reference


def run_onnx(path, image: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: image.numpy()})[0]


def error_budget(reference: ICNet, image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The reference build's logits in float64, and the error allowed against them: twice that of the
    same build in float32, plus a small atol (the export folds BatchNorm, which reorders the rounding)."""
    with torch.inference_mode():
        expected = copy.deepcopy(reference).double()(image.double())
        err_float32 = (reference(image).double() - expected).abs().max().item()
    return expected, 2 * err_float32 + 1e-6 * expected.abs().max().item()


def assert_matches_reference(path, reference: ICNet, shape) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ONNX Runtime's logits on a random image, the float64 reference's and the allowed error."""
    torch.manual_seed(sum(shape))
    image = torch.randn(shape) * 60
    expected, budget = error_budget(reference, image)
    got = torch.from_numpy(run_onnx(path, image)).double()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= budget
    return got, expected, budget


def input_dims(path) -> list:
    (graph_input,) = onnx.load(str(path)).graph.input
    return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    model = random_icnet("sub124", fused=True)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "dynamic.onnx", size=(193, 257),
                       dynamic_batch=True, dynamic_size=True)
    return path, reference_of(model)


def test_export_holds_only_standard_onnx_operators(dynamic_export):
    path, _ = dynamic_export
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    nodes = list(graph.graph.node)
    for node in nodes:  # the If node's branches too
        nodes += [n for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH
                  for n in attribute.g.node]
    assert {node.domain for node in nodes} <= {"", "ai.onnx"}
    assert not graph.functions
    assert {"Conv", "Resize", "If"} <= {node.op_type for node in nodes}
    assert "BatchNormalization" not in {node.op_type for node in nodes}  # folded into the convolutions


@pytest.mark.parametrize("shape", [(1, 3, MIN_DYNAMIC_SIDE, MIN_DYNAMIC_SIDE), (3, 3, 200, 333), (2, 3, 193, 257)])
def test_dynamic_export_matches_the_reference_build_at_other_batches_and_sizes(dynamic_export, shape):
    path, reference = dynamic_export
    assert input_dims(path) == ["batch", 3, "height", "width"]
    assert_matches_reference(path, reference, shape)


def test_dynamic_export_pools_with_the_released_geometry_at_1025x2049(dynamic_export, monkeypatch):
    """Traced at another size, the graph still switches to the released pooling windows on the 33x65 map."""
    path, reference = dynamic_export
    image_shape = (1, 3, 1025, 2049)
    _, expected, budget = assert_matches_reference(path, reference, image_shape)
    monkeypatch.setattr(icnet.model, "RELEASED_PPM_MAP", (0, 0))  # the builds now pool adaptively everywhere
    torch.manual_seed(sum(image_shape))
    with torch.inference_mode():
        adaptive = reference(torch.randn(image_shape) * 60).double()
    assert (adaptive - expected).abs().max().item() > 10 * budget  # the check above tells the two apart


@pytest.mark.parametrize("mode", ["sub4", "sub24"])
def test_fixed_size_export_of_each_mode_matches_the_reference_build(tmp_path, mode):
    model = random_icnet(mode, fused=True, seed=1)
    path = export_onnx(model, tmp_path / f"{mode}.onnx", size=(161, 225), batch=2)
    assert input_dims(path) == [2, 3, 161, 225]
    assert_matches_reference(path, reference_of(model), (2, 3, 161, 225))


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    model = random_icnet("sub124", fused=False, seed=2)
    save_checkpoint(tmp_path / "model.pt", model)
    out = tmp_path / "model.onnx"
    assert main(["export", "--onnx", str(out), "--weights", str(tmp_path / "model.pt"), "--size", "161x193",
                 "--dynamic-batch"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert input_dims(out) == ["batch", 3, 161, 193]
    assert_matches_reference(out, model, (2, 3, 161, 193))
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["icnet.preprocessing"]) == DEFAULT_PREPROCESSING.to_dict()
    assert json.loads(metadata["icnet.class_names"]) == list(CLASS_NAMES)


@pytest.mark.parametrize("kwargs, message", [
    ({"size": (160, 400), "dynamic_size": True}, "size must be at least 161x161"),
    ({"size": (0, 400)}, "size must be two positive integers"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"opset": 11}, "opset must be an integer of at least 18"),
])
def test_bad_export_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(ICNet(width=WIDTH), tmp_path / "x.onnx", **kwargs)


def test_bad_export_targets_are_named(tmp_path):
    with pytest.raises(ValueError, match="path must name an .onnx file"):
        export_onnx(ICNet(width=WIDTH), tmp_path / "x.txt")
    with pytest.raises(ValueError, match="model must be an ICNet"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.onnx")


def test_cli_reports_bad_export_arguments_in_one_line(tmp_path, capsys):
    assert main(["export", "--onnx", str(tmp_path / "x.onnx"), "--size", "100x100", "--dynamic-size"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "icnet: size must be at least 161x161 for a dynamic-size export (the pyramid pooling needs " \
                      "a 6x6 map), got 100x100"
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export", "--onnx", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "the folder of" in capsys.readouterr().err and not (tmp_path / "missing").exists()
