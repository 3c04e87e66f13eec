"""ONNX Runtime and OpenVINO, the CPU runtimes a user would deploy ICNet with instead of this library, as
end-to-end runners (benchmarks.icnet_e2e's "onnxruntime" and "openvino"), and their per-node profiles grouped
by ICNet's layer groups.

Each runner runs the graph of icnet.export (the reference build's network and weights as standard ONNX),
exported at the benchmark's input shape (fixed sizes, as for a deployment at one camera resolution), and is
handed to benchmarks.icnet_e2e, which times it in alternating rounds with the PyTorch builds. ONNX Runtime runs its
CPU provider with every optimisation; OpenVINO the CPU device with the latency hint at the configuration's
precision: f32 for float32 and bf16 for bfloat16 (left to itself, OpenVINO computes a float32 graph in
bfloat16 on CPUs with native bfloat16). Both use torch's intra-op thread count. A runner whose package is
absent is skipped with a message.

Profiles: every node's time from the runtime's own profiler (ONNX Runtime's SessionOptions.enable_profiling,
OpenVINO's PERF_COUNT), summed per layer group of benchmarks.layer_groups. A node belongs to the group of
the ICNet submodule it was exported from (the exporter records the module in the node's name_scopes); the
resizes ICNet's forward calls itself, and the layout reorders the runtimes insert, belong to the group of
the node they feed (a reorder of a node's output, to that node's).
"""

import ast
import importlib.util
import json
import logging
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import layer_groups
from icnet.export import export_onnx

log = logging.getLogger("benchmarks")

# ICNet's submodules, by the layer group (benchmarks.layer_groups) that spans them; the classifiers are the head
MODULE_GROUPS = {"conv1": "trunk", "pool1": "trunk", "conv2": "trunk", "conv3_1": "trunk",
                 "conv3_rest": "sub4_branch", "conv4": "sub4_branch", "conv5": "sub4_branch", "ppm": "ppm",
                 "conv5_4": "conv5_4", "cff_sub24": "cff_sub24", "sub1": "sub1", "cff_sub12": "cff_sub12",
                 "cls_sub4": layer_groups.HEAD, "cls_sub24": layer_groups.HEAD, "cls_sub124": layer_groups.HEAD}
OPENVINO_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
_exports_dir = tempfile.TemporaryDirectory(prefix="icnet-onnx-")
_exported: dict[tuple, Path] = {}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _available(package: str, config, device: torch.device, dtypes) -> bool:
    if device.type != "cpu" or config.dtype not in dtypes:
        return False
    if not installed(package):
        log.warning("%s is not installed: its runner is skipped (pip install %s)", package, package)
        return False
    return True


def runs_onnxruntime(config, device: torch.device) -> bool:
    """ONNX Runtime's CPU provider computes float32 convolutions only."""
    return _available("onnxruntime", config, device, (torch.float32,))


def runs_openvino(config, device: torch.device) -> bool:
    return _available("openvino", config, device, tuple(OPENVINO_PRECISIONS))


def exported_graph(model: torch.nn.Module, x: torch.Tensor) -> Path:
    """model's ONNX export at x's shape, made once per model and shape in this process."""
    key = (id(model), tuple(x.shape))
    if key not in _exported:
        path = Path(_exports_dir.name) / f"icnet-{len(_exported)}.onnx"
        log.info("  exporting ONNX at %s", list(x.shape))
        _exported[key] = export_onnx(model, path, size=tuple(x.shape[-2:]), batch=x.shape[0])
    return _exported[key]


def _image(x: torch.Tensor):
    """The runtimes' input: the float32 graph's NCHW image as a numpy array (a view where x is one)."""
    return x.float().contiguous().numpy()


def onnxruntime_session(path: Path, profile_prefix: str | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime running model's export: image tensor -> logits tensor."""
    session = onnxruntime_session(exported_graph(model, x))
    (name,) = (i.name for i in session.get_inputs())
    return lambda image: torch.from_numpy(session.run(None, {name: _image(image)})[0])


def openvino_compiled(path: Path, dtype: torch.dtype, profile: bool = False):
    import openvino

    properties = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[dtype],
                  "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": profile}
    return openvino.Core().compile_model(str(path), "CPU", properties)


def openvino_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """OpenVINO running model's export at x's precision: image tensor -> logits tensor (float32)."""
    request = openvino_compiled(exported_graph(model, x), x.dtype).create_infer_request()

    def run(image: torch.Tensor) -> torch.Tensor:
        request.infer({0: _image(image)})
        return torch.from_numpy(request.get_output_tensor(0).data)
    return run


def node_groups(path: Path) -> dict[str, str]:
    """name -> layer group, for every node and every node output of the exported graph. A node ICNet's
    forward ran outside its submodules (a resize) takes the group of the next node that has one, the last
    ones the head's."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    scoped = []
    for node in graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"),
                      [])
        scoped.append(MODULE_GROUPS.get(scopes[1]) if len(scopes) > 2 else None)
    groups, following = {}, layer_groups.HEAD
    for node, group in zip(reversed(graph.node), reversed(scoped)):
        following = group or following
        for name in (node.name, *node.output):
            groups[name] = following
    return groups


def grouped_ms(events: list[tuple[str, float]], groups: dict[str, str], reorder: Callable[[str], str | None]) -> dict:
    """{group: ms, ..., "total": ms, "reorder_ms": ms} of one call's (runtime node name, us) events in execution
    order. reorder(name) says "output" for a reorder of the previous node's output, "input" for one of the
    next node's input, None for other nodes; a node not in groups (the runtimes' own) takes the next group."""
    labels = [groups.get(name) for name, _ in events]
    following = layer_groups.HEAD
    for i in reversed(range(len(events))):
        if labels[i] is None and reorder(events[i][0]) != "output":
            labels[i] = following
        following = labels[i] or following
    previous = None
    for i, label in enumerate(labels):
        labels[i] = label or previous or layer_groups.HEAD
        previous = labels[i]
    ms = {}
    for (name, us), label in zip(events, labels):
        ms[label] = ms.get(label, 0.0) + us / 1e3
    reorder_ms = sum(us for name, us in events if reorder(name)) / 1e3
    return ms | {"total": sum(us for _, us in events) / 1e3, "reorder_ms": reorder_ms}


def _median_groups(calls: list[dict]) -> dict:
    keys = [*(g for g in (*layer_groups.GROUPS, layer_groups.HEAD) if any(g in c for c in calls)),
            "total", "reorder_ms"]
    return {key: statistics.median(c.get(key, 0.0) for c in calls) for key in keys}


def _ort_name(event_name: str) -> str:
    """ONNX Runtime names a node it rewrote into its blocked layout after the original's output."""
    return event_name.removesuffix("_kernel_time").removesuffix("_nchwc")


def _ort_reorder(name: str) -> str | None:
    return "output" if name.startswith("ReorderOutput") else "input" if name.startswith("ReorderInput") else None


def onnxruntime_group_ms(model: torch.nn.Module, x: torch.Tensor, calls: int, warmup: int = 1) -> dict:
    """ONNX Runtime's node times per layer group, medians over calls (see the module docstring)."""
    path = exported_graph(model, x)
    groups = node_groups(path)
    with tempfile.TemporaryDirectory() as folder:
        session = onnxruntime_session(path, profile_prefix=str(Path(folder) / "ort"))
        (name,) = (i.name for i in session.get_inputs())
        for _ in range(warmup + calls):
            session.run(None, {name: _image(x)})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][warmup:]
    per_call = []
    for run in runs:
        inside = [(_ort_name(e["name"]), e["dur"]) for e in events
                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                  and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]]
        per_call.append(grouped_ms(inside, groups, _ort_reorder))
    return _median_groups(per_call)


def openvino_group_ms(model: torch.nn.Module, x: torch.Tensor, calls: int, warmup: int = 1) -> dict:
    """OpenVINO's node times per layer group at x's precision, medians over calls."""
    path = exported_graph(model, x)
    groups = node_groups(path)
    request = openvino_compiled(path, x.dtype, profile=True).create_infer_request()
    per_call = []
    for call in range(warmup + calls):
        request.infer({0: _image(x)})
        if call >= warmup:
            # OpenVINO names a node it split after the original ("node_Conv_12/WithoutBiases")
            executed = [p for p in request.get_profiling_info() if p.status.name == "EXECUTED"]
            events = [(p.node_name.split("/")[0], p.real_time.total_seconds() * 1e6) for p in executed]
            reorders = {p.node_name.split("/")[0] for p in executed if p.node_type == "Reorder"}
            per_call.append(grouped_ms(events, groups, lambda name: "input" if name in reorders else None))
    return _median_groups(per_call)


PROFILERS = {"onnxruntime": onnxruntime_group_ms, "openvino": openvino_group_ms}
