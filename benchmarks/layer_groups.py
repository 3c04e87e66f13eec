"""Where ICNet's inference time goes, per group of layers, so that the next bottleneck is visible.

Times come from forward pre/post hooks on ICNet's submodules, so the model itself carries no timing code:
on a GPU a CUDA event is recorded at each hook (the span between two events is GPU time, launch gaps
included), on the CPU perf_counter is read (the ops run synchronously). Each group spans two hook points;
a point is (submodule name, "pre" or "post"), "" naming the whole model.
"""

import statistics
import time

import torch
from torch import nn

GROUPS = {
    "trunk": (("", "pre"), ("conv3_1", "post")),  # the 1/2 image shrink, conv1, pool1, conv2, conv3_1
    "sub4_branch": (("conv3_1", "post"), ("conv5", "post")),  # conv3_1's 1/2 shrink, conv3_rest, conv4, conv5
    "ppm": (("ppm", "pre"), ("ppm", "post")),
    "conv5_4": (("conv5_4", "pre"), ("conv5_4", "post")),
    "cff_sub24": (("cff_sub24", "pre"), ("cff_sub24", "post")),
    "sub1": (("sub1", "pre"), ("sub1", "post")),
    "cff_sub12": (("cff_sub12", "pre"), ("cff_sub12", "post")),
}
TOTAL = (("", "pre"), ("", "post"))
# Not timed by hooks: the total minus the groups that ran, i.e. the classifier, the final resizes, and the
# (tiny) time between one group's last hook and the next one's first.
HEAD = "head"


class _WallClock:
    @staticmethod
    def stamp() -> float:
        return time.perf_counter()

    @staticmethod
    def wait() -> None:
        pass

    @staticmethod
    def ms(start: float, end: float) -> float:
        return (end - start) * 1e3


class _CudaClock:
    def __init__(self, device: torch.device):
        self.device = device

    def stamp(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def ms(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)


def layer_group_samples_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 1) -> list[dict[str, float]]:
    """Per inference call of model(x) after warmup calls: {group: ms} for the GROUPS that ran (ICNet's mode
    decides which), HEAD and "total"."""
    clock = _CudaClock(x.device) if x.device.type == "cuda" else _WallClock()
    stamps = {}

    def hook_at(point):
        def hook(*_):
            if point in stamps:
                raise RuntimeError(f"layer groups: {point[0] or 'the model'} ran twice in one forward")
            stamps[point] = clock.stamp()
        return hook

    handles = []
    for name, kind in dict.fromkeys(point for span in (*GROUPS.values(), TOTAL) for point in span):
        module = model.get_submodule(name)
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(register(hook_at((name, kind))))
    samples = []
    try:
        with torch.inference_mode():
            for call in range(warmup + repeats):
                stamps.clear()
                model(x)
                clock.wait()
                if call >= warmup:
                    samples.append(_spans_ms(stamps, clock))
    finally:
        for handle in handles:
            handle.remove()
    return samples


def _spans_ms(stamps: dict, clock) -> dict[str, float]:
    spans = {group: clock.ms(stamps[start], stamps[end]) for group, (start, end) in GROUPS.items()
             if start in stamps and end in stamps}
    total = clock.ms(*(stamps[point] for point in TOTAL))
    return spans | {HEAD: total - sum(spans.values()), "total": total}


def layer_group_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 1) -> dict[str, float]:
    """{group: median ms over repeats} of model(x) in inference (see layer_group_samples_ms). Medians are
    taken per group, so they need not add up to the median total exactly."""
    samples = layer_group_samples_ms(model, x, repeats, warmup)
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}
