"""Distributed training helpers: one process per device, launched by torchrun (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), NCCL on GPUs and gloo on CPUs.

BatchNorm statistics must span the global batch, or distributed training is not the same computation as
one process with the same global batch. nn.SyncBatchNorm does that on GPUs only; GlobalBatchNorm2d below
does it on any device with a differentiable all-reduce, so CPU runs (and the gloo test) are exact too.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_environment(device: torch.device) -> World:
    """Joins the process group torchrun describes in the environment; a single process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch summed over all processes.

    Two all-reduces (sum, then the sum of squared deviations from the global mean: the same two-pass
    variance as one process computes), both differentiable, so gradients flow to every process's inputs.
    Outside training, or with one process, it is nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        dist.all_reduce(count)
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = differentiable_all_reduce(compute.sum((0, 2, 3))) / count
        centred = compute - mean.reshape(1, -1, 1, 1)
        variance = differentiable_all_reduce((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.num_batches_tracked += 1
            unbiased = variance * (count / (count - 1).clamp(min=1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(variance + self.eps).reshape(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
        return y.to(x.dtype)


def synchronise_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of model computes global-batch statistics: nn.SyncBatchNorm on GPUs (its CUDA
    kernels), GlobalBatchNorm2d elsewhere. Parameter and buffer names do not change."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, device=device)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            synchronise_batch_norm(child, device)
    return model



