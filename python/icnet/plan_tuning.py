"""Per-layer backend choice for an inference plan, by measurement on the plan's own inputs.

The layers with more than one implementation (pyramid pooling and the two cascade feature fusion units:
the compiled kernel, the Triton kernel on a GPU, and ATen's composition, the reference; every convolution:
the library's, cuDNN or oneDNN, or icnet's Triton implicit GEMM on a GPU) are each timed with every
implementation that runs here, on the tensors they receive for the plan's example, and keep the fastest. The choice is a plain {layer: backend} dict, which a results file can keep and a later build can
take as it is, without measuring again.
"""

import statistics
import time

import torch
from torch import nn

import icnet_kernels
from icnet_kernels.backends import triton_usable

TUNABLE = ("ppm", "cff_sub24", "cff_sub12")
OP_BACKENDS = ("native", "triton", "reference")


def tunable_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's layers that have a backend to choose, by name: pyramid pooling, the fusion units and
    every convolution (each of which says its own candidates)."""
    layers = {name: getattr(network, name) for name in TUNABLE if hasattr(network, name)}
    return layers | {name: m for name, m in network.named_modules() if hasattr(m, "backend_candidates")}


def candidates(layer: nn.Module, device: torch.device) -> list[str]:
    """The implementations of layer that can run on device; Triton only on a GPU (the interpreter is a test
    tool). Pyramid pooling and the fusion units: the compiled kernel, Triton, ATen's composition."""
    if hasattr(layer, "backend_candidates"):
        return layer.backend_candidates(device)
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
            raise ValueError(f"choices: {name!r} is not a tunable layer of this plan")
        allowed = layers[name].backend_candidates(torch.device("cuda")) if hasattr(
            layers[name], "backend_candidates") else OP_BACKENDS
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
