"""Where ICNet's inference time goes, per group of layers, so that the next bottleneck is visible.

Times come from forward pre/post hooks on ICNet's submodules, so the model itself carries no timing code:
on a GPU a CUDA event is recorded at each hook (the span between two events is GPU time, launch gaps
included), on the CPU perf_counter is read (the ops run synchronously). Each group spans two hook points;
a point is (submodule name, "pre" or "post"), "" naming the whole model.

On a GPU an eager span is mostly launch gaps wherever the kernels are shorter than their launches, which a
CUDA graph removes; layer_group_kernel_ms therefore also sums, per group, the durations of the kernels it
launches (torch.profiler), the time a graph replay of the same model spends there.
"""

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

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

    points = dict.fromkeys(point for span in (*GROUPS.values(), TOTAL) for point in span)
    samples = []
    with _hooks_at(model, points, hook_at), torch.inference_mode():
        for call in range(warmup + repeats):
            stamps.clear()
            model(x)
            clock.wait()
            if call >= warmup:
                samples.append(_spans_ms(stamps, clock))
    return samples


@contextlib.contextmanager
def _hooks_at(model: nn.Module, points: Iterable[tuple[str, str]], hook_at: Callable) -> Iterator[None]:
    """hook_at(point) as a forward pre-hook ("pre") or hook ("post") of each point's submodule, removed on exit."""
    handles = []
    try:
        for name, kind in points:
            module = model.get_submodule(name)
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(hook_at((name, kind))))
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def layer_group_kernel_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 1) -> dict[str, float]:
    """{group: ms per call} of model(x) in inference, summed over the device kernels that the group's ops
    launch, for the GROUPS that ran, HEAD (total minus them) and "total" (every kernel of the call).

    Each group is a profiler range opened and closed by the same hooks as layer_group_samples_ms; a range's
    device time is that of the kernels launched inside it. On the CPU, where there are no kernels, the
    ranges' CPU time stands in, so that the attribution can be tested there.
    """
    spans = {"total": TOTAL, **GROUPS}  # total first: its range opens before the trunk's at the same point
    actions: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for group, (start, end) in spans.items():
        actions.setdefault(start, []).append(("open", group))
        actions.setdefault(end, []).append(("close", group))
    open_ranges, ran = {}, set()

    def hook_at(point):
        def hook(*_):
            # closing first: at a shared point one group ends where the next begins
            for action, group in sorted(actions[point], key=lambda a: a[0] != "close"):
                if action == "close" and group in open_ranges:
                    open_ranges.pop(group).__exit__(None, None, None)
                    ran.add(group)
                elif action == "open":
                    open_ranges[group] = record_function(f"layer_group::{group}")
                    open_ranges[group].__enter__()
        return hook

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _hooks_at(model, actions, hook_at), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        ran.clear()
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
    totals_us = dict.fromkeys(ran, 0.0)
    for event in prof.events():
        group = event.name.removeprefix("layer_group::")
        if event.name.startswith("layer_group::") and event.device_type == DeviceType.CPU and group in totals_us:
            totals_us[group] += event.device_time_total if cuda else event.cpu_time_total
    ms = {group: totals_us[group] / 1e3 / repeats for group in GROUPS if group in totals_us}
    total = totals_us["total"] / 1e3 / repeats
    return ms | {HEAD: total - sum(ms.values()), "total": total}
