"""Test setup: Triton runs interpreted on machines without a GPU, and outputs start as NaN.

TRITON_INTERPRET must be set before triton is first imported, which importing icnet_kernels does.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def poison_uninitialized_outputs():
    """Every torch.empty* (the kernels' outputs included) starts as NaN, so an element a kernel never
    writes fails the comparison instead of passing by luck."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous
    torch.use_deterministic_algorithms(False)
