"""What run.py needs from each op's benchmark module: its cases, inputs, float64 reference and providers."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration of an op.

    params: the op's own keyword arguments. min_bytes: inputs read once plus output written once, the
    traffic no implementation can avoid. flops: the arithmetic the op needs, not what a provider executes.
    """
    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: dict[str, Any]
    min_bytes: int
    flops: int

    def describe(self) -> dict:
        return {"op": self.op, "variant": self.variant, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch.")}


Provider = Callable[..., torch.Tensor]


class OpBenchmark(Protocol):
    """An op's benchmark module (see pyramid_pool_sum.py); run.OPS lists them by NAME."""
    NAME: str

    def cases(self, device: torch.device, quick: bool) -> list[Case]: ...

    def make_inputs(self, case: Case, device: torch.device) -> tuple[torch.Tensor, ...]: ...

    def reference(self, case: Case, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def providers(self, device: torch.device) -> dict[str, Callable[[Case], Provider]]: ...
