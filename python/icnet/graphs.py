"""Fixed-shape inference through a captured CUDA graph: one launch per forward pass instead of hundreds."""

import itertools
import logging

import torch

log = logging.getLogger(__name__)


def weights_version(modules: list[torch.nn.Module]) -> tuple:
    """A value that changes whenever a parameter or buffer of these modules is written in place (its version
    counter), replaced by another tensor, or moved (its storage): what a captured graph's reads depend on.
    Read from each module's own dicts, which costs a fraction of model.parameters()' recursive walk."""
    return tuple((t.data_ptr(), t._version) for module in modules
                 for tensors in (module._parameters, module._buffers) for t in tensors.values() if t is not None)


class CudaGraphRunner:
    """Captures model(x) for x's shape, dtype and layout; calling it copies the input in and replays.

    The returned tensor is the graph's static output, overwritten by the next call: clone it to keep it.
    A graph replays the kernels it captured on the weights it captured, including values derived from them
    (BatchNorm folded into a convolution is computed once, outside the graph), so a call after any
    parameter or buffer of the model changed captures again (recapture=True, the default) or raises.
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, warmup: int = 3, recapture: bool = True):
        untracked = next((name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                          if t.is_inference()), None)
        if untracked is not None:
            raise ValueError(f"model: {untracked} is an inference tensor (made under torch.inference_mode), whose "
                             "changes cannot be seen, so a graph could replay stale weights; create or load the "
                             "model outside inference mode")
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        self.model, self.warmup, self.recapture = model, warmup, recapture
        with torch.inference_mode(False):  # a normal tensor, which calls inside or outside inference mode can fill
            self.static_input = example.clone()
        self.captures = 0
        self._capture()

    def _capture(self) -> None:
        device = self.static_input.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(self.warmup):  # lazy initialisation, autotuning, caches and fallbacks outside the capture
                self.model(self.static_input)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph, self.static_output = None, None  # the old graph's memory goes back before the new capture
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            output = self.model(self.static_input)
        self.graph, self.static_output = graph, output
        self.modules = list(self.model.modules())
        self.version = weights_version(self.modules)
        self.captures += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(f"this graph was captured for {tuple(self.static_input.shape)} {self.static_input.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        if weights_version(self.modules) != self.version:
            if not self.recapture:
                raise RuntimeError("the model's parameters or buffers changed after this CUDA graph was captured: "
                                   "its replay would use the old ones; build a new CudaGraphRunner")
            log.info("icnet: the model's weights changed since the CUDA graph was captured: capturing again")
            self._capture()
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output
