"""Tuned plan choices read back from the end-to-end benchmark's results file (its plan-tuned rows), by
device, mode, dtype, layout and shape, on the plan's CPU twin; no match: untuned, said once."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import icnet_kernels
from icnet import ICNet, api
from icnet.plan import InferencePlan, LabelPlans
from icnet.plan_tuning import TunedChoices, device_name
from icnet.segment import segment
from tests.test_icnet_model import randomize_batch_norm

pytestmark = pytest.mark.skipif(not icnet_kernels.native_available(), reason="the plan runs the native CPU ops")

SIZE = (33, 49)
TUNED = {"ppm": "reference", "cff_sub24": "native", "cff_sub12": "reference", "conv1.0": "library"}


def tiny_model(mode="sub124"):
    torch.manual_seed(0)
    return randomize_batch_norm(ICNet(num_classes=19, width=0.125, mode=mode), seed=1).eval()


def row(choices, batch=1, size=SIZE, mode="sub124", dtype="float32", layout="nchw", tuned=True, runner="plan-tuned"):
    fields = {"mode": mode, "batch": batch, "dtype": dtype, "layout": layout, "input": [batch, 3, *size],
              "runner": runner, "plan_choices": choices}
    if tuned:
        fields["plan_timings_ms"] = {name: {"native": 1.0, "reference": 2.0} for name in choices}
    return fields


def write_results(path, rows, device=None):
    path.write_text(json.dumps({"meta": {"device": device or device_name(torch.device("cpu"))}, "rows": rows}))
    return path


def test_a_plan_applies_the_tuned_row_of_its_device_mode_dtype_layout_and_shape(tmp_path, caplog):
    other = {"ppm": "native", "cff_sub24": "reference", "cff_sub12": "native"}
    results = write_results(tmp_path / "results.json", [
        row(other), row(TUNED),                                        # the last one written wins
        row(other, mode="sub24"), row(other, dtype="bfloat16"), row(other, layout="channels_last"),
        row(other, batch=2), row(other, size=(41, 65)),
        {"mode": "sub124", "runner": "fused-eager", "p50_ms": 3.0},    # not a plan's row
        row(other, tuned=False, runner="plan")])                       # measured, not tuned: not a choice
    model = tiny_model()
    image = torch.randn(1, 3, *SIZE) * 60
    untuned = InferencePlan(model, image).choices
    for choices in (results, str(results), TunedChoices(results)):
        plan = InferencePlan(model, image, choices=choices)
        assert plan.choices == untuned | TUNED and plan.choices != untuned
    with caplog.at_level(logging.WARNING, logger="icnet.plan_tuning"):
        assert not caplog.records
        elsewhere = write_results(tmp_path / "gpu.json", [row(TUNED)], device="NVIDIA H200")
        assert InferencePlan(model, image, choices=elsewhere).choices == untuned
        assert len(caplog.records) == 1 and "no tuned plan choices" in caplog.text and "gpu.json" in caplog.text
        assert "sub124 float32 nchw input 1x3x33x49" in caplog.text


def test_a_results_row_of_another_build_s_layers_is_refused_by_name(tmp_path):
    results = write_results(tmp_path / "results.json", [row({"cff_sub12": "reference"}, mode="sub4")])
    with pytest.raises(ValueError, match="choices: 'cff_sub12'"):
        InferencePlan(tiny_model("sub4"), torch.randn(1, 3, *SIZE) * 60, choices=results)


def test_label_plans_look_each_shape_up_and_say_once_that_one_is_missing(tmp_path, caplog):
    results = write_results(tmp_path / "results.json", [row(TUNED, batch=2)])
    model = tiny_model()
    plans = LabelPlans(model, choices=results)
    with caplog.at_level(logging.WARNING, logger="icnet.plan_tuning"):
        pair, single = torch.randn(2, 3, *SIZE) * 60, torch.randn(1, 3, *SIZE) * 60
        assert plans.plan_for(pair).choices.items() >= TUNED.items()
        assert plans.plan_for(single).choices == InferencePlan(model, single).choices
        plans.plans.clear()  # built again, looked up again: no second line
        plans(single)
    assert len(caplog.records) == 1 and "input 1x3x33x49" in caplog.text


def test_segment_runs_the_tuned_choices_and_writes_the_same_class_maps(tmp_path, monkeypatch, capsys):
    built = []

    class Recorded(LabelPlans):
        def plan_for(self, x):
            plan = super().plan_for(x)
            built.append(plan.choices)
            return plan

    monkeypatch.setattr(api, "LabelPlans", Recorded)
    from icnet.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    (tmp_path / "images").mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "a.png")
    results = write_results(tmp_path / "results.json", [row(TUNED)])
    segment([tmp_path / "images"], tmp_path / "tuned", tmp_path / "tiny.pt", device="cpu", plan=True,
            plan_choices=results)
    assert built and all(choices.items() >= TUNED.items() for choices in built)
    segment([tmp_path / "images"], tmp_path / "model", tmp_path / "tiny.pt", device="cpu", plan=False)
    capsys.readouterr()
    tuned, plain = (np.asarray(Image.open(tmp_path / out / "a_trainIds.png")) for out in ("tuned", "model"))
    assert (tuned == plain).mean() >= 0.998


@pytest.mark.parametrize("content, message", [
    ("not json", "not a JSON results file"), (b"\xff\xfe\x00", "not a JSON results file"),
    ("[]", "not a benchmark results file"), ('{"meta": {}, "rows": []}', "not a benchmark results file"),
    ('{"meta": {"device": "x"}, "rows": [{"plan_choices": {}, "plan_timings_ms": {}}]}', "row 0 lacks"),
    (json.dumps({"meta": {"device": "x"}, "rows": [row({"ppm": 3})]}), "row 0 .*plan_choices"),
    (json.dumps({"meta": {"device": "x"}, "rows": [row(["ppm"])]}), "row 0 .*plan_choices"),
])
def test_a_bad_results_file_is_refused_by_name(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"plan choices: .*bad.json.*{message}"):
        TunedChoices(path)
