"""Argument helpers shared by the ops' Python checks."""

import operator


def require(condition, message: str) -> None:
    """Raises ValueError(message) unless condition holds: the ops' checks in Python read like TORCH_CHECK_VALUE."""
    if not condition:
        raise ValueError(message)


def exact_int(name: str, value) -> int:
    """value as an int if it is one (Python, NumPy or a 0-d integer tensor); bools and floats are refused
    rather than silently truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
