"""Per-layer backend choice for an inference plan, by measurement on the plan's own inputs.

The layers with more than one implementation (pyramid pooling and the two cascade feature fusion units:
the compiled kernel, the Triton kernel on a GPU, and ATen's composition, the reference; pyramid pooling also
folded into conv5_4 on a GPU, so its times include conv5_4's, which the fold replaces; every convolution:
the library's, cuDNN or oneDNN, or icnet's Triton implicit GEMM on a GPU) are each timed with every
implementation that runs here, on the tensors they receive for the plan's example, and keep the fastest. The choice is a plain {layer: backend} dict, which a results file can keep and a later build can
take as it is, without measuring again: TunedChoices reads them back from the end-to-end benchmark's results
file for the device, mode, dtype, layout and input shape they were measured on.
"""

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import icnet_kernels
from icnet_kernels.backends import triton_usable
from icnet_kernels.cff_geometry import memory_format_of

log = logging.getLogger(__name__)

TUNABLE = ("ppm", "cff_sub24", "cff_sub12")
OP_BACKENDS = ("native", "triton", "reference")


def tunable_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's layers that have a backend to choose, by name: pyramid pooling, the fusion units and
    every convolution (each of which says its own candidates)."""
    layers = {name: getattr(network, name) for name in TUNABLE if hasattr(network, name)}
    return layers | {name: m for name, m in network.named_modules() if hasattr(m, "backend_candidates")}


def candidates(layer: nn.Module, device: torch.device) -> list[str]:
    """The implementations of layer that can run on device; Triton only on a GPU (the interpreter is a test
    tool). Pyramid pooling and the fusion units: the compiled kernel, Triton, ATen's composition, and the
    layer's fold_backends (Triton kernels) on a GPU."""
    if hasattr(layer, "backend_candidates"):
        return layer.backend_candidates(device)
    found = []
    if icnet_kernels.native_available() and (device.type == "cpu" or icnet_kernels.native_cuda_available()):
        found.append("native")
    if device.type == "cuda" and triton_usable(device):
        found += ["triton", *getattr(layer, "fold_backends", ())]
    return found + ["reference"]


def apply_choices(network: nn.Module, choices: dict[str, str]) -> None:
    """Sets each named layer's backend; ValueError naming choices for an unknown layer or backend."""
    layers = tunable_layers(network)
    for name, backend in choices.items():
        if name not in layers:
            raise ValueError(f"choices: {name!r} is not a tunable layer of this plan")
        allowed = layers[name].backend_candidates(torch.device("cuda")) if hasattr(
            layers[name], "backend_candidates") else OP_BACKENDS + getattr(layers[name], "fold_backends", ())
        if backend not in allowed:
            raise ValueError(f"choices: {name!r} names the backend {backend!r}, not one of {list(allowed)}")
        layers[name].backend = backend


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # compiling, autotuning and first-touch allocations stay out of the times
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(network: nn.Module, example: torch.Tensor, repeats: int = 5) -> dict[str, dict[str, float]]:
    """{layer: {backend: median ms}} for every tunable layer with more than one implementation that runs
    here, each timed on the inputs the layer receives from example. The layers keep the fastest backend."""
    layers = {name: layer for name, layer in tunable_layers(network).items()
              if len(candidates(layer, example.device)) > 1}
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: inputs.setdefault(name, (args, kwargs)), with_kwargs=True)
        for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            network(example)
    finally:
        for hook in hooks:
            hook.remove()
    timings = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            args, kwargs = inputs[name]
            timings[name] = {}
            for backend in candidates(layer, example.device):
                layer.backend = backend
                timings[name][backend] = _median_ms(lambda: layer(*args, **kwargs), example.device, repeats)
            layer.backend = min(timings[name], key=timings[name].get)
    return timings


def device_name(device: torch.device) -> str:
    """The device as a results file's meta names it: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def results_key(device: torch.device, mode: str, example: torch.Tensor) -> tuple:
    """What a tuned choice is looked up by: (device name, mode, dtype, layout, input shape), named as the
    results rows name them."""
    layout = "channels_last" if memory_format_of(example) == torch.channels_last else "nchw"
    return device_name(device), mode, str(example.dtype).removeprefix("torch."), layout, tuple(example.shape)


class TunedChoices:
    """The tuned plan choices of an end-to-end benchmark results file (its rows with plan_choices and
    plan_timings_ms, as the plan-tuned runner writes them), by device, mode, dtype, layout and input shape.
    The file is read and checked when this is made: ValueError naming it if it is not such a file. Where
    several rows match, the last one written wins."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            results = json.loads(self.path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"plan choices: {self.path} is not a JSON results file ({error})") from None
        if not (isinstance(results, dict) and isinstance(results.get("meta"), dict)
                and isinstance(results["meta"].get("device"), str) and isinstance(results.get("rows"), list)):
            raise ValueError(f"plan choices: {self.path} is not a benchmark results file "
                             "(a JSON object with meta.device and rows)")
        self.choices = {}
        for index, row in enumerate(results["rows"]):
            if isinstance(row, dict) and "plan_choices" in row and "plan_timings_ms" in row:
                key, choices = self._tuned_row(results["meta"]["device"], row, index)
                self.choices[key] = choices
        self._unmatched = set()

    def _tuned_row(self, device: str, row: dict, index: int) -> tuple[tuple, dict[str, str]]:
        key = (device, *(row.get(name) for name in ("mode", "dtype", "layout")), row.get("input"))
        choices = row["plan_choices"]
        if not (all(isinstance(v, str) for v in key[1:4]) and isinstance(key[4], list)
                and all(isinstance(v, int) for v in key[4]) and isinstance(choices, dict)
                and all(isinstance(name, str) and isinstance(b, (str, type(None))) for name, b in choices.items())):
            raise ValueError(f"plan choices: {self.path}: row {index} lacks its mode, dtype, layout or input, "
                             "or its plan_choices are not {layer: backend} names")
        # None is the library's default backend, which an untouched layer keeps
        return (*key[:4], tuple(key[4])), {name: b for name, b in choices.items() if b is not None}

    def lookup(self, mode: str, example: torch.Tensor) -> dict[str, str] | None:
        """The choices measured for a plan of mode built for example (on its device), or None, logged once
        per configuration, when the file has none: the plan then runs untuned."""
        key = results_key(example.device, mode, example)
        if key in self.choices:
            return dict(self.choices[key])
        if key not in self._unmatched:
            self._unmatched.add(key)
            log.warning("icnet: %s has no tuned plan choices for %s %s %s %s input %s: the plan runs untuned",
                        self.path, *key[:4], "x".join(map(str, key[4])))
        return None


def read_choices(choices):
    """choices as InferencePlan takes them, a results file's path read into its TunedChoices (once, so that
    its errors come first and its log line once)."""
    return TunedChoices(choices) if isinstance(choices, (str, os.PathLike)) else choices
