"""The CPU CFF kernel's Winograd F(2x2, 3x3) convolution (csrc/cpu/winograd_conv3x3.h), on its own: against
conv2d(padding=1) in float64 on random shapes, odd maps and channel counts off its 16-channel blocks
included, in every layout; NaN reaching exactly the direct convolution's outputs; bad input.

Through the CFF op it runs whenever the shortcut applies at sizes like the tests' (test_cascade_feature_fusion);
ICNet's sub12 stage is larger than its cache criterion, and the direct convolution serves it.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import icnet_kernels
from tests.helpers import ATOL, LAYOUTS, assert_within_budget, in_layout

pytestmark = pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")


def winograd(x, weight):
    return torch.ops.icnet._conv3x3_winograd(x, weight)


def random_pair(n, c, co, h, w, seed):
    """Input and weight drawn in float64, the weight scaled by 1/sqrt(fan-in) so that outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(co, c, 3, 3, generator=gen, dtype=torch.float64) * (9 * c) ** -0.5
    return x, weight


@given(n=st.integers(1, 3), c=st.sampled_from((1, 3, 15, 16, 17, 40)), co=st.sampled_from((1, 5, 16, 33)),
       h=st.integers(1, 12), w=st.integers(1, 12), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_matches_conv2d(n, c, co, h, w, layout, seed):
    x64, w64 = random_pair(n, c, co, h, w, seed)
    x, weight = in_layout(x64.float(), layout), w64.float()
    out = winograd(x, weight)
    assert out.shape == (n, co, h, w) and out.dtype == torch.float32 and out.is_contiguous()
    exact = F.conv2d(x64, w64, padding=1)
    assert_within_budget(out, exact, F.conv2d(x64.float(), weight, padding=1), ATOL[torch.float32],
                         f"n={n} c={c} co={co} {h}x{w} {layout}")


@pytest.mark.parametrize("where", [(0, 0), (1, 2), (4, 4), (6, 8)], ids=["corner", "inside", "tile-corner", "last"])
def test_nan_reaches_exactly_the_direct_convolutions_outputs(where):
    """A NaN enters only the transformed terms of the outputs whose 3x3 window holds it."""
    x, weight = random_pair(1, 3, 4, 7, 9, seed=1)
    x, weight = x.float(), weight.float()
    x[0, 1, where[0], where[1]] = float("nan")
    expected = F.conv2d(x, weight, padding=1)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(winograd(x, weight).isnan(), expected.isnan())


def test_empty_inputs():
    x, weight = torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3)
    assert winograd(x, weight).shape == (0, 4, 5, 5)
    out = winograd(torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3))
    assert out.shape == (2, 4, 5, 5) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("x,weight,message", [
    (torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3), "input must be"),
    (torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3), "weight must be"),
    (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 1, 1), "weight must be"),
    (torch.randn(1, 3, 5, 5).double(), torch.randn(4, 3, 3, 3).double(), "float32"),
    (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3).half(), "float32"),
], ids=["input-3d", "channel-mismatch", "kernel-1x1", "float64", "mixed-dtypes"])
def test_bad_input_names_the_argument(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        winograd(x, weight)
