"""Per-layer backend choice for an inference plan, by measurement on the plan's own inputs.

The layers with more than one implementation (pyramid pooling and the two cascade feature fusion units:
the compiled kernel, the Triton kernel on a GPU, and ATen's composition, the reference) are each timed
with every implementation that runs here, on the tensors they receive for the plan's example, and keep the
fastest. The choice is a plain {layer: backend} dict, which a results file can keep and a later build can
take as it is, without measuring again.
"""

import statistics
import time

import torch
from torch import nn

import icnet_kernels
from icnet_kernels.backends import triton_usable

TUNABLE = ("ppm", "cff_sub24", "cff_sub12")


def tunable_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's layers that have a backend to choose, by name."""
    return {name: getattr(network, name) for name in TUNABLE if hasattr(network, name)}


def candidates(device: torch.device) -> list[str]:
    """The implementations that can run on device; Triton only on a GPU (the interpreter is a test tool)."""
    found = []
    if icnet_kernels.native_available() and (device.type == "cpu" or icnet_kernels.native_cuda_available()):
        found.append("native")
    if device.type == "cuda" and triton_usable(device):
        found.append("triton")
    return found + ["reference"]


def apply_choices(network: nn.Module, choices: dict[str, str]) -> None:
    """Sets each named layer's backend; ValueError naming choices for an unknown layer or backend."""
    layers = tunable_layers(network)
    for name, backend in choices.items():
        if name not in layers:
            raise ValueError(f"choices: {name!r} is not a tunable layer of this plan ({sorted(layers)})")
        if backend not in ("native", "triton", "reference"):
            raise ValueError(f"choices: {name!r} names the unknown backend {backend!r}")
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
    """{layer: {backend: median ms}} for every tunable layer and every implementation that runs here, each
    timed on the inputs the layer receives from example. The layers keep the fastest backend."""
    layers = tunable_layers(network)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args))
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
            timings[name] = {}
            for backend in candidates(example.device):
                layer.backend = backend
                timings[name][backend] = _median_ms(lambda: layer(*inputs[name]), example.device, repeats)
            layer.backend = min(timings[name], key=timings[name].get)
    return timings
