"""The end-to-end benchmark's arithmetic: FLOP and byte counts against closed forms, the layer-group timer's
bookkeeping on a tiny input, and the roofline floor on hand-picked numbers. No timing is asserted."""

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icnet_kernels
from benchmarks import cpu_peers, icnet_e2e, layer_groups, network_cost, plot, roofline
from icnet import ICNet
from icnet.layers import ConvBN, ReferenceCascadeFeatureFusion


def conv2d_flops(input_shape, conv: nn.Conv2d) -> int:
    """2 * N * Cout * (Cin / groups) * kh * kw * Hout * Wout."""
    out = [(size + 2 * pad - dil * (k - 1) - 1) // stride + 1 for size, pad, dil, k, stride
           in zip(input_shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (2 * input_shape[0] * conv.out_channels * (conv.in_channels // conv.groups)
            * math.prod(conv.kernel_size) * math.prod(out))


@pytest.mark.parametrize("groups", [1, 3])
def test_flops_of_one_conv2d_are_twice_its_multiply_adds(groups):
    conv = nn.Conv2d(6, 9, 3, stride=2, padding=2, dilation=2, groups=groups)
    x = torch.randn(2, 6, 17, 23)
    # 9x12 outputs: (17 + 4 - 4 - 1) // 2 + 1 and (23 + 4 - 4 - 1) // 2 + 1
    expected = 2 * 2 * 9 * (6 // groups) * 9 * 9 * 12
    assert conv2d_flops(x.shape, conv) == expected
    assert network_cost.count_flops(conv, x) == {"total": expected, "convolution": expected, "dense": expected}


class TinyCascade(nn.Module):
    """ICNet in miniature: a stride-2 stem, pooling, a dilated conv, a fusion unit on the exact 2x zoom, a
    classifier with bias."""

    def __init__(self, fused: bool):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 2, fused=fused)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.deep = ConvBN(8, 16, 3, 1, dilation=2, fused=fused)
        fusion = icnet_kernels.CascadeFeatureFusion if fused else ReferenceCascadeFeatureFusion
        self.cff = fusion(16, 8, 12, 2)
        self.cls = nn.Conv2d(12, 5, 1)

    def forward(self, image):
        high = self.stem(image)
        return self.cls(self.cff(self.deep(self.pool(high)), high))


def _tiny_cascade_flops() -> tuple[int, int]:
    """(definition, cheapest exact) FLOPs of TinyCascade on a 65x129 image: stem 33x65, pooled 17x33."""
    stem = 2 * 8 * 3 * 9 * 33 * 65
    deep = 2 * 16 * 8 * 9 * 17 * 33
    cls = 2 * 5 * 12 * 33 * 65
    cff_direct = 2 * 33 * 65 * 12 * (9 * 16 + 8)
    cff_shortcut = 2 * 12 * (17 * 33 * 9 * 16 + 33 * 65 * 8)  # the 3x3 conv at the low map's 17x33
    return stem + deep + cls + cff_direct, stem + deep + cls + cff_shortcut


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_flops_of_a_tiny_icnet_like_network_match_the_closed_form(fused):
    with torch.device("meta"):
        model, image = TinyCascade(fused).eval(), torch.empty(1, 3, 65, 129)
    direct, shortcut = _tiny_cascade_flops()
    counted = network_cost.count_flops(model, image)
    assert counted["dense"] == shortcut
    if not fused:  # the fused unit's op has no FlopCounterMode formula: only dense counts it
        assert counted["total"] == counted["convolution"] == direct


def test_icnet_convolution_flops_are_the_sum_over_its_convolutions():
    with torch.device("meta"):
        model, image = ICNet(mode="sub124", fused=False).eval(), torch.empty(1, 3, 1025, 2049)
    expected = []
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_pre_hook(lambda module, args: expected.append(conv2d_flops(args[0].shape, module)))
    counted = network_cost.count_flops(model, image)
    assert counted["convolution"] == sum(expected)
    assert len(expected) == 64  # stems 2 * 3, bottlenecks 16 * 3 + 4 projections, conv5_4, fusions 2 * 2, classifier


class ConvResizeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        return self.b(F.interpolate(self.a(x), scale_factor=2.0))


def test_bytes_count_each_activation_between_layers_once_each_way():
    counted = network_cost.count_bytes(ConvResizeConv().eval(), torch.randn(1, 3, 5, 7))
    # a's output (4x5x7) and the resize's (4x10x14), each written once and read once
    assert counted == {"image": 3 * 35 * 4, "logits": 2 * 140 * 4, "weights": (12 + 4 + 8 + 2) * 4,
                       "activations": 2 * (4 * 35 + 4 * 140) * 4}


class ClassifyAndZoom(nn.Module):
    """A 1x1 conv then the segmentation head's classifier and 4x zoom, as the fused ICNet's head runs."""

    def __init__(self):
        super().__init__()
        self.conv, self.classifier = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return icnet_kernels.segmentation_head(self.conv(x), self.classifier.weight, self.classifier.bias, 4)


def test_the_fused_head_counts_its_classifier():
    """The head op classifies inside one kernel: its FLOPs and its weights are counted all the same."""
    with torch.device("meta"):
        model, image = ClassifyAndZoom().eval(), torch.empty(2, 3, 5, 7)
    flops = network_cost.count_flops(model, image)
    assert flops["dense"] == flops["total"] == 2 * 2 * 35 * (3 * 8 + 8 * 5)
    counted = network_cost.count_bytes(model, image)
    assert counted["weights"] == (24 + 8 + 40 + 5) * 4
    assert counted["activations"] == 2 * 2 * 8 * 35 * 4  # the conv's output only, written once and read once


@pytest.fixture
def one_thread():
    """Tiny inputs run best on one thread, and a busy shared machine cannot oversubscribe it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Every part of ICNet's forward but the head, in forward order; the sub4 mode stops after conv5_4.
TIMED_GROUPS = {"sub4": ["trunk", "sub4_branch", "ppm", "conv5_4"],
                "sub124": ["trunk", "sub4_branch", "ppm", "conv5_4", "cff_sub24", "sub1", "cff_sub12"]}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("mode", ["sub4", "sub124"])
def test_layer_groups_cover_the_timed_submodules_within_the_total(device, fused, mode):
    model = ICNet(mode=mode, fused=fused).eval().to(device)
    x = torch.randn(1, 3, 65, 129, device=device)
    samples = layer_groups.layer_group_samples_ms(model, x, repeats=2)
    assert len(samples) == 2
    for sample in samples:
        assert list(sample) == [*TIMED_GROUPS[mode], layer_groups.HEAD, "total"]
        assert all(ms >= 0 for ms in sample.values()), sample
        timed_ms = sum(ms for group, ms in sample.items() if group in layer_groups.GROUPS)
        assert timed_ms <= sample["total"]
        assert timed_ms + sample[layer_groups.HEAD] == pytest.approx(sample["total"])
    medians = layer_groups.layer_group_ms(model, x, repeats=1)
    assert sum(ms for group, ms in medians.items() if group != "total") == pytest.approx(medians["total"])
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sub4", "sub124"])
def test_layer_group_kernel_times_cover_the_timed_submodules_within_the_total(device, mode):
    model = ICNet(mode=mode, fused=True).eval().to(device)
    ms = layer_groups.layer_group_kernel_ms(model, torch.randn(1, 3, 65, 129, device=device), repeats=2)
    assert list(ms) == [*TIMED_GROUPS[mode], layer_groups.HEAD, "total"]
    assert all(ms[group] > 0 for group in TIMED_GROUPS[mode]), ms  # every group launches work
    assert sum(ms[group] for group in TIMED_GROUPS[mode]) <= ms["total"]
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.usefixtures("one_thread")
def test_layer_group_kernel_times_attribute_work_to_its_group():
    """A 200 ms delay inside sub1 (CPU time: the CPU's stand-in for kernel time) lands in sub1 alone (long
    enough that no group's own work reaches it on a busy machine)."""
    model = ICNet(mode="sub124", fused=True).eval()
    x = torch.randn(1, 3, 65, 129)
    next(model.sub1.children()).register_forward_pre_hook(lambda *_: time.sleep(0.2))  # inside sub1's range
    ms = layer_groups.layer_group_kernel_ms(model, x, repeats=2)
    assert ms["sub1"] >= 200
    assert all(value < 200 for group, value in ms.items() if group not in ("sub1", "total")), ms


def test_floor_is_the_slower_of_memory_and_arithmetic():
    # 2 GB at 1000 GB/s: 2 ms; 1 TFLOP at 100 TFLOP/s: 10 ms
    assert roofline.floor_ms(2e9, 1e12, 1000, 100) == (pytest.approx(10.0), "compute")
    assert roofline.floor_ms(2e9, 1e11, 1000, 100) == (pytest.approx(2.0), "memory")
    assert roofline.floor_ms(2e9, 0, 1000, 100) == (pytest.approx(2.0), "memory")


def test_end_to_end_rows_report_the_share_of_each_floor():
    cost = {"flops": 4e12, "dense_flops": 2e12, "min_bytes": 1e9, "layerwise_bytes": 3e12}
    peaks = roofline.Peaks(gbps=1000, tflops={"float32": 1.0}, source="hand-picked")
    # dense: 2e12 at 1 TFLOP/s is 2000 ms; min bytes 1 ms; layerwise bytes 3000 ms
    fields = icnet_e2e._roofline_fields(cost, 4000.0, peaks, "float32")
    assert fields == {"tflops": pytest.approx(1.0), "floor_ms": pytest.approx(2000), "roofline_bound": "compute",
                      "pct_of_roofline_floor": pytest.approx(50),
                      "layerwise_floor_ms": pytest.approx(3000), "layerwise_bound": "memory",
                      "pct_of_layerwise_floor": pytest.approx(75)}


@pytest.mark.parametrize("name, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", True, (3350, 495, 989)),
    ("NVIDIA H100 80GB HBM3", False, (3350, 67, 989)),
    ("NVIDIA H100 PCIe", True, (2000, 378, 756)),
    ("NVIDIA H200", True, (4800, 495, 989)),
])
def test_datasheet_peaks_of_known_gpus(name, tf32, expected):
    peaks = roofline.datasheet_peaks(name, tf32)
    assert (peaks.gbps, peaks.tflops["float32"], peaks.tflops["bfloat16"]) == expected


def test_unknown_devices_have_no_datasheet_peaks():
    assert roofline.datasheet_peaks("AMD EPYC", False) is None


def test_end_to_end_chart_is_written_beside_the_results(tmp_path):
    pytest.importorskip("matplotlib")
    config = {"mode": "sub124", "batch": 1, "dtype": "float32", "layout": "nchw", "floor_ms": 5.0,
              "layerwise_floor_ms": 9.0}
    rows = [config | {"runner": runner, "p20_ms": ms - 1, "p50_ms": ms, "p80_ms": ms + 1,
                      "layer_groups_ms": {"trunk": ms / 2, "ppm": ms / 4, layer_groups.HEAD: ms / 4, "total": ms}}
            for runner, ms in (("reference-eager", 40.0), ("fused-eager", 20.0))]
    results = tmp_path / "icnet-test.json"
    results.write_text(json.dumps({"meta": {"benchmark": "icnet end to end", "device": "test", "device_kind": "cpu",
                                            "torch": torch.__version__, "git_commit": "0" * 40}, "rows": rows}))
    png = plot.write_plot(results)
    assert png == tmp_path / "icnet-test.png" and png.stat().st_size > 0


def test_layer_group_tables_show_eager_spans_and_kernel_times():
    config = {"mode": "sub4", "batch": 1, "dtype": "float16", "layout": "channels_last"}
    rows = [config | {"runner": "fused-eager", "layer_groups_ms": {"trunk": 2.5, "total": 4.0},
                      "layer_groups_kernel_ms": {"trunk": 0.25, "total": 0.5}},
            config | {"runner": "fused-cuda-graph", "p50_ms": 1.0}]
    eager, kernels = icnet_e2e.format_layer_groups(rows).split("\n\n")
    assert eager.startswith("layer groups, ms:") and "fused-eager" in eager and "fused-cuda-graph" not in eager
    assert eager.splitlines()[1].split() == ["trunk", "2.50"]
    assert kernels.startswith("kernel ms:") and kernels.splitlines()[2].split() == ["total", "0.50"]


def test_gpu_configurations_the_goals_name_come_first():
    chosen = icnet_e2e.configs(torch.device("cuda"), quick=False)
    assert len(chosen) == len(set(chosen)) == 18
    assert [(c.mode, c.batch, c.dtype) for c in chosen[:2]] == [("sub124", 1, torch.float16), ("sub124", 16, torch.float16)]


def test_resume_measures_only_the_runners_missing_from_the_results(tmp_path, monkeypatch):
    done, missing = (icnet_e2e.Config("sub4", 1, torch.float32, False), icnet_e2e.Config("sub24", 1, torch.float32, False))
    measured = []

    def fake_run_config(config, device, effort, peaks, runners, on_row):
        measured.append((config, runners))
        for runner in runners:
            on_row(config.describe() | {"runner": runner, "p50_ms": 1.0})

    monkeypatch.setattr(icnet_e2e, "configs", lambda device, quick: [done, missing])
    monkeypatch.setattr(icnet_e2e, "run_config", fake_run_config)
    monkeypatch.setattr(roofline, "measured_peaks", lambda dtypes, device, effort: roofline.Peaks(
        gbps=1.0, tflops={"float32": 1.0}, source="test", dense_rates={}))
    monkeypatch.setattr(icnet_e2e, "format_table", lambda rows: "")
    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)
    path = tmp_path / f"icnet-{icnet_e2e.report.slug(icnet_e2e.report.device_name(torch.device('cpu')))}-quick.json"
    earlier = done.describe() | {"runner": "reference-eager", "p50_ms": 7.0}
    path.write_text(json.dumps({"meta": {}, "rows": [earlier]}))
    assert icnet_e2e.main(["--device", "cpu", "--quick", "--resume", "--out", str(tmp_path),
                           "--runners", "reference-eager", "fused-eager"]) == 0
    assert measured == [(done, ["fused-eager"]), (missing, ["reference-eager", "fused-eager"])]
    rows = json.loads(path.read_text())["rows"]
    assert [(row["mode"], row["runner"], row["p50_ms"]) for row in rows] == [
        ("sub4", "reference-eager", 7.0), ("sub4", "fused-eager", 1.0),
        ("sub24", "reference-eager", 1.0), ("sub24", "fused-eager", 1.0)]
    assert rows[1]["speedup_vs_reference_eager"] == 7.0


class Killed(BaseException):
    """Stands for a time limit's kill: not an Exception, so no runner catches it."""


def _tiny_run(monkeypatch, runners: dict) -> list[dict]:
    for name, runner in runners.items():
        monkeypatch.setitem(icnet_e2e.RUNNERS, name, runner)
    monkeypatch.setattr(icnet_e2e, "EAGER_RUNNERS", ())  # no layer-group timing: faster
    rows = []
    config = icnet_e2e.Config("sub124", 1, torch.float32, False, (33, 65))
    peaks = roofline.Peaks(gbps=1.0, tflops={"float32": 1.0}, source="test")
    try:
        icnet_e2e.run_config(config, torch.device("cpu"), icnet_e2e.timing.QUICK, peaks, list(runners), rows.append)
    except Killed:
        pass
    return rows


def _killed(model, x):
    raise Killed


def _no_engine(model, x):
    raise RuntimeError("no engine\nmore")


@pytest.mark.usefixtures("one_thread")
def test_a_failing_runner_gets_a_row_and_the_next_runner_still_runs(monkeypatch):
    rows = _tiny_run(monkeypatch, {"reference-eager": icnet_e2e.Runner(lambda models: models["reference"], _no_engine),
                                   "fused-eager": icnet_e2e.Runner(lambda models: models["fused"])})
    assert [row["runner"] for row in rows] == ["reference-eager", "fused-eager"]
    assert rows[0]["error"] == "RuntimeError: no engine" and "p50_ms" not in rows[0]
    assert rows[1]["p50_ms"] > 0 and rows[1]["compile_s"] >= 0 and rows[1]["epilogue_fallbacks"] == {}


@pytest.mark.usefixtures("one_thread")
def test_a_copied_model_is_prepared_outside_inference_mode(monkeypatch):
    """A copy made in inference mode would hold inference tensors, which have no version counters for the
    fused build's caches to check (the Triton runner copies the fused build)."""
    rows = _tiny_run(monkeypatch, {"fused-eager": icnet_e2e.Runner(
        lambda models: icnet_e2e.with_backend(models["fused"], "reference"))})
    assert "error" not in rows[0] and rows[0]["p50_ms"] > 0


@pytest.mark.usefixtures("one_thread")
def test_a_killed_runner_leaves_the_rows_written_before_it(monkeypatch):
    """On the CPU the runners are timed together once all are built: a kill while building leaves only the
    error rows written before it; on a GPU each runner's row is written before the next one starts."""
    rows = _tiny_run(monkeypatch, {"reference-eager": icnet_e2e.Runner(lambda models: models["reference"], _no_engine),
                                   "fused-eager": icnet_e2e.Runner(lambda models: models["fused"], _killed)})
    assert [row["runner"] for row in rows] == ["reference-eager"]


def test_gpu_runners_come_in_the_order_the_goals_compare_them():
    goal = icnet_e2e.Config("sub124", 1, torch.float16, True)
    cuda = torch.device("cuda")
    applicable = [name for name, runner in icnet_e2e.RUNNERS.items() if runner.applies(goal, cuda)]
    assert applicable[:4] == ["reference-eager", "fused-eager", "fused-cuda-graph", "fused-triton-cuda-graph"]
    assert applicable[-1] == "reference-compile-max-autotune"
    other = icnet_e2e.Config("sub4", 1, torch.float32, True)
    assert not any(icnet_e2e.RUNNERS[name].compiles for name in icnet_e2e.RUNNERS
                   if icnet_e2e.RUNNERS[name].applies(other, cuda))
    on_cpu = [name for name in icnet_e2e.RUNNERS if icnet_e2e.RUNNERS[name].applies(goal, torch.device("cpu"))]
    assert on_cpu[:2] == ["reference-eager", "fused-eager"]
    assert not any("cuda-graph" in name or icnet_e2e.RUNNERS[name].compiles for name in on_cpu)


def test_on_the_cpu_torch_compile_runs_beside_the_peers_in_their_configurations():
    cpu = torch.device("cpu")
    frozen = icnet_e2e.RUNNERS["reference-compile-frozen"]
    assert frozen.compiles and "reference-compile-frozen" in cpu_peers.RUNNERS
    for dtype in (torch.float32, torch.bfloat16):
        assert frozen.applies(icnet_e2e.Config("sub124", 4, dtype, False), cpu)
    assert not frozen.applies(icnet_e2e.Config("sub4", 1, torch.float32, False), cpu)
    assert not frozen.applies(icnet_e2e.Config("sub124", 1, torch.float16, True), cpu)
    assert not frozen.applies(icnet_e2e.Config("sub124", 1, torch.float32, False), torch.device("cuda"))


def test_the_cpu_peers_readme_tables_come_from_the_rows():
    def row(runner, repeat, p50, **extra):
        return {"batch": 1, "dtype": "float32", "runner": runner, "repeat": repeat, "p50_ms": p50,
                "argmax_agreement": 0.99995} | extra
    groups = dict.fromkeys(cpu_peers.GROUP_NAMES, 1.0)
    rows = [row("fused-eager", 1, 100.0, layer_groups_ms=groups), row("reference-compile-frozen", 1, 180.0),
            row("onnxruntime", 1, 150.0, layer_groups_ms=groups | {"head": 9.0}), row("fused-eager", 2, 120.0),
            row("reference-compile-frozen", 2, 130.0), row("onnxruntime", 2, 150.0),
            {"batch": 1, "dtype": "float32", "runner": "openvino", "repeat": 1, "error": "not installed"}]
    table = cpu_peers.format_markdown(rows).splitlines()
    assert table[0] == ("| batch | dtype | fused build ms | torch.compile ms | ONNX Runtime ms | faster peer / fused "
                        "| fused build's argmax agreement |")
    assert table[2] == "| 1 | float32 | 100, 120 | 180, 130 | 150, 150 | 1.50, 1.08 | 99.995% |"
    assert table[4] == "| layer group | fused build, float32 | ONNX Runtime, float32 |"
    assert "| head (classifier, final resizes) | 1 | 9 |" in table


def test_with_backend_switches_every_icnet_op_of_a_copy():
    fused = ICNet(mode="sub124", fused=True).eval()
    switched = icnet_e2e.with_backend(fused, "triton")
    backends = [m.backend for m in switched.modules() if hasattr(m, "backend")]
    assert len(backends) == 3 and set(backends) == {"triton"}  # the pyramid pooling and both CFF units
    assert {m.backend for m in fused.modules() if hasattr(m, "backend")} == {None}


def test_network_cost_counts_the_fused_build_whatever_backend_is_forced(monkeypatch):
    """The meta-device count runs the ops' fake kernels, which every backend shares."""
    expected = network_cost.icnet_cost("sub24", 1, torch.float32, torch.contiguous_format, (97, 161))
    monkeypatch.setenv("ICNET_BACKEND", "triton")
    assert network_cost.icnet_cost("sub24", 1, torch.float32, torch.contiguous_format, (97, 161)) == expected


def _out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")


def test_on_a_gpu_a_function_failing_when_timed_fails_alone(monkeypatch):
    monkeypatch.setattr(icnet_e2e.timing, "_time_cuda_ms", lambda fn, effort: (fn(), (1.0, 2.0, 3.0))[1])
    times, errors = icnet_e2e.timing.time_or_fail({"a": lambda: None, "b": _out_of_memory, "c": lambda: None},
                                                  torch.device("cuda"), icnet_e2e.timing.QUICK)
    assert times == {"a": (1.0, 2.0, 3.0), "c": (1.0, 2.0, 3.0)}
    assert errors == {"b": "while timed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_on_the_cpu_functions_timed_in_turns_fail_together():
    times, errors = icnet_e2e.timing.time_or_fail({"a": lambda: None, "b": _out_of_memory}, torch.device("cpu"),
                                                  icnet_e2e.timing.QUICK)
    assert times == {} and set(errors) == {"a", "b"}


@pytest.mark.usefixtures("one_thread")
def test_a_runner_failing_when_timed_gets_a_row_that_says_so(monkeypatch):
    def out_of_memory(fns, device, effort):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(icnet_e2e.timing, "time_together_ms", out_of_memory)
    rows = _tiny_run(monkeypatch, {"reference-eager": icnet_e2e.Runner(lambda models: models["reference"]),
                                   "fused-eager": icnet_e2e.Runner(lambda models: models["fused"])})
    assert [row["runner"] for row in rows] == ["reference-eager", "fused-eager"]
    assert all(row["error"] == "while timed: OutOfMemoryError: CUDA out of memory" and "p50_ms" not in row
               for row in rows)
