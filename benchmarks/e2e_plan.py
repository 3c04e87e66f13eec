"""The inference plan (icnet.plan) as end-to-end benchmark runners: "plan" returns logits (on a GPU with the
pyramid pooling folded into conv5_4, the plan's default there), "plan-labels" the uint8 labels,
"plan-triton" logits with pyramid pooling and the fusion units on their Triton kernels instead of the
native CUDA ones, "plan-tuned" logits with each of those layers on the implementation measured fastest at
build (its row keeps the choice and the times, plan_choices and plan_timings_ms). On a GPU each call
replays the plan's CUDA graph; building it (folding, layouts, Triton compilation, capture) counts as the
runner's compile_s."""

import torch

from icnet.plan import InferencePlan


def plan_runner(labels: bool, backend: str | None = None, tune: bool = False):
    def wrap(model: torch.nn.Module, x: torch.Tensor) -> InferencePlan:
        return InferencePlan(model, x, labels=labels, backend=backend, tune=tune)
    return wrap


def row_fields(runner) -> dict:
    """What a plan runner adds to its results row: its layers' backends and, when tuned, their times."""
    if not isinstance(runner, InferencePlan):
        return {}
    fields = {"plan_choices": runner.choices}
    if runner.timings is not None:
        fields["plan_timings_ms"] = runner.timings
    return fields


def predicted_labels(output: torch.Tensor) -> torch.Tensor:
    """The class map of a runner's output: the labels themselves, or the argmax of logits."""
    return output if output.dtype == torch.uint8 else output.argmax(1)
