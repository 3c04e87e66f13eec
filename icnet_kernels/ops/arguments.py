"""Argument helpers shared by the ops' Python checks."""

import operator

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 is the references' alone


def require(condition, message: str) -> None:
    """Raises ValueError(message) unless condition holds: the ops' checks in Python read like TORCH_CHECK_VALUE."""
    if not condition:
        raise ValueError(message)


def tensor_argument(name: str, value) -> torch.Tensor:
    """value, if it is a tensor; anything else (a list, a number) is refused by name."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    return value


def exact_int(name: str, value) -> int:
    """value as an int if it is one (Python, NumPy or a 0-d integer tensor); bools and floats are refused
    rather than silently truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def require_feature_map(op: str, name: str, x: torch.Tensor, axes: str, kernel: bool) -> None:
    """x is a 4-D floating-point tensor (axes names its dimensions, e.g. "N, C, H, W") and, when a Triton
    kernel is to run on it (kernel), in one of the dtypes the Triton kernels take."""
    require(x.dim() == 4, f"{op}: {name} must be a 4-D tensor [{axes}], got {x.dim()} dimensions")
    require(x.is_floating_point(), f"{op}: {name} must be floating point, got {x.dtype}")
    if kernel:
        require(x.dtype in TRITON_DTYPES,
                f"{op}: {name} must be float32, float16 or bfloat16 for the Triton kernel, got {x.dtype}")
