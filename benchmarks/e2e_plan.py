"""The inference plan (icnet.plan) as end-to-end benchmark runners: "plan" returns logits, "plan-labels" the
uint8 labels, "plan-triton" logits with pyramid pooling and the fusion units on their Triton kernels instead
of the native CUDA ones. On a GPU each call replays the plan's CUDA graph; building it (folding, layouts,
Triton compilation, capture) counts as the runner's compile_s."""

import torch

from icnet.plan import InferencePlan


def plan_runner(labels: bool, backend: str | None = None):
    def wrap(model: torch.nn.Module, x: torch.Tensor) -> InferencePlan:
        return InferencePlan(model, x, labels=labels, backend=backend)
    return wrap


def predicted_labels(output: torch.Tensor) -> torch.Tensor:
    """The class map of a runner's output: the labels themselves, or the argmax of logits."""
    return output if output.dtype == torch.uint8 else output.argmax(1)
