"""The CPU peers' runners and profiles (benchmarks.e2e_onnx) on a narrow ICNet at a small size: the runners'
logits against the reference build, every exported node in its layer group, and the profiles' bookkeeping.
No timing is asserted."""

import pytest
import torch
from torch import nn

from benchmarks import e2e_onnx, layer_groups
from icnet import ICNet

SHAPE = (1, 3, 161, 225)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = ICNet(mode="sub124", width=0.125, fused=False).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def image():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 60


def test_grouped_ms_puts_reorders_and_the_runtimes_own_nodes_beside_their_neighbours():
    groups = {"a": "trunk", "b": "ppm"}
    events = [("ReorderInput", 1000), ("a", 2000), ("ReorderOutput_1", 500), ("constant_of_the_runtime", 100),
              ("b", 3000), ("last_of_the_runtime", 50)]
    ms = e2e_onnx.grouped_ms(events, groups, e2e_onnx._ort_reorder)
    assert ms == {"trunk": pytest.approx(3.5), "ppm": pytest.approx(3.1), layer_groups.HEAD: pytest.approx(0.05),
                  "total": pytest.approx(6.65), "reorder_ms": pytest.approx(1.5)}


def test_every_exported_convolution_is_in_its_submodule_s_layer_group(reference, image):
    import onnx

    path = e2e_onnx.exported_graph(reference, image)
    groups = e2e_onnx.node_groups(path)
    expected = {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.Conv2d) and name.split(".")[0] in e2e_onnx.MODULE_GROUPS:
            group = e2e_onnx.MODULE_GROUPS[name.split(".")[0]]
            expected[group] = expected.get(group, 0) + 1
    if reference.mode == "sub124":  # eval runs one classifier of three
        expected[layer_groups.HEAD] -= 2
    counted = {}
    graph = onnx.load(str(path)).graph
    for node in graph.node:
        if node.op_type == "Conv":
            counted[groups[node.name]] = counted.get(groups[node.name], 0) + 1
    assert counted == expected
    resizes = [groups[node.name] for node in graph.node if node.op_type == "Resize"]
    # the image's 1/2 shrink, conv3_1's 1/2 shrink, one resize in each CFF unit, the zoom and the final resize
    assert resizes == ["trunk", "sub4_branch", "cff_sub24", "cff_sub12", layer_groups.HEAD, layer_groups.HEAD]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runners_return_the_reference_build_s_logits(reference, image, runtime):
    pytest.importorskip(runtime)
    runner = getattr(e2e_onnx, f"{runtime}_runner")(reference, image)
    with torch.inference_mode():
        expected = reference(image)
    got = runner(image)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_profiles_cover_every_layer_group_and_add_up(reference, image, runtime):
    pytest.importorskip(runtime)
    ms = e2e_onnx.PROFILERS[runtime](reference, image, calls=2)
    assert list(ms)[:-2] == [*layer_groups.GROUPS, layer_groups.HEAD]
    assert all(ms[group] > 0 for group in (*layer_groups.GROUPS, layer_groups.HEAD)), ms
    assert 0 <= ms["reorder_ms"] <= ms["total"]
    # medians of two calls are their means, which add up like the calls' own times
    assert sum(ms[group] for group in (*layer_groups.GROUPS, layer_groups.HEAD)) == pytest.approx(ms["total"])


def test_runners_are_skipped_with_a_message_where_their_package_is_absent(monkeypatch, caplog):
    config = type("Config", (), {"dtype": torch.float32})()
    monkeypatch.setattr(e2e_onnx, "installed", lambda package: False)
    assert not e2e_onnx.runs_onnxruntime(config, torch.device("cpu"))
    assert not e2e_onnx.runs_openvino(config, torch.device("cpu"))
    assert "onnxruntime is not installed" in caplog.text and "openvino is not installed" in caplog.text
