"""Cascade feature fusion forward: every backend and kernel path vs the float64 reference, layouts, edge
geometries, border rows and columns, defaults, empty batches, NaN and inf."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import icnet_kernels
from tests.cascade_feature_fusion_cases import (
    Geometry, as_float64, check_forward, geometry, lay_out, make_inputs, reference, run_fused)
from tests.helpers import ATOL, LAYOUTS, assert_within_budget, backend_cases, dtypes_for


@pytest.mark.parametrize("backend,device", backend_cases())
@given(data=st.data())
def test_matches_reference_on_random_inputs(backend, device, data):
    g = data.draw(geometry(backend, device), label="geometry")
    dtype = data.draw(st.sampled_from(dtypes_for(backend, device)), label="dtype")
    low_layout = data.draw(st.sampled_from(LAYOUTS), label="low layout")
    high_layout = data.draw(st.sampled_from(LAYOUTS), label="high layout")
    inputs = make_inputs(g, dtype, device, data.draw(st.integers(0, 2**31 - 1), label="seed"),
                         weight_high_4d=data.draw(st.booleans(), label="weight_high 4-D"))
    check_forward(backend, device, lay_out(inputs, low_layout, high_layout), g, f"{low_layout}/{high_layout}")


# Shapes that a random draw reaches only by luck: the smallest shortcut maps (H or W = 3, where row 1 is
# also row H-2), 1x1 low maps, no resize at all, a dilation larger than the map, near-misses of the shortcut.
EDGE_GEOMETRIES = [
    Geometry(1, 3, 2, 4, 2, 2, 3, 3, 2, True),
    Geometry(2, 1, 3, 5, 2, 5, 3, 9, 2, True),
    Geometry(1, 2, 1, 3, 5, 2, 9, 3, 2, True),
    Geometry(1, 3, 2, 4, 1, 1, 5, 7, 2, True),
    Geometry(1, 3, 2, 4, 1, 1, 5, 7, 1, False),
    Geometry(2, 3, 2, 3, 6, 7, 6, 7, 1, True),
    Geometry(1, 2, 3, 3, 3, 3, 5, 5, 4, True),
    Geometry(1, 4, 2, 3, 4, 6, 9, 17, 2, True),
    Geometry(1, 4, 2, 3, 5, 9, 9, 17, 2, False),
    Geometry(1, 4, 2, 3, 5, 9, 9, 17, 1, True),
    Geometry(1, 3, 3, 2, 4, 4, 8, 8, 2, False),
    Geometry(1, 3, 2, 4, 5, 6, 6, 8, 2, False),  # under a 2x pixel ratio: the CPU's blocked path, not tap-first
]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", EDGE_GEOMETRIES,
                         ids=lambda g: f"{g.h}x{g.w}to{g.H}x{g.W}-d{g.dilation}-ac{int(g.align_corners)}")
def test_edge_geometries(backend, device, g):
    interpreted = backend == "triton" and device == "cpu"  # its random cases cover the layouts
    for layout in ("contiguous",) if interpreted else ("contiguous", "channels_last"):
        check_forward(backend, device, lay_out(make_inputs(g, device=device, seed=7), layout, layout), g, layout)


ICNET_LIKE = Geometry(1, 16, 8, 16, 9, 17, 17, 33, 2, True)  # low 9x17 -> high 17x33, the exact shortcut


@pytest.mark.skipif(not icnet_kernels.native_available(), reason="_C not built")
@pytest.mark.parametrize("align_corners", [True, False], ids=["shortcut", "general"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_icnet_like_shape_native(align_corners, layout):
    g = replace(ICNET_LIKE, align_corners=align_corners)
    assert g.shortcut == align_corners
    check_forward("native", "cpu", lay_out(make_inputs(g, seed=3), layout, layout), g, layout)


def border_slices(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Rows 1 and H-2 and columns 1 and W-2: where the shortcut's zero-padding correction applies."""
    return torch.cat([t[:, :, [1, g.H - 2], :].flatten(1), t[:, :, :, [1, g.W - 2]].flatten(1)], dim=1)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("align_corners", [True, False], ids=["shortcut", "general"])
def test_icnet_like_shape_border_rows_and_columns(backend, device, align_corners):
    """A wrong padding correction changes only these pixels, so they get their own comparison: the error
    budget on the slices alone in every dtype the backend takes, and float64 to round-off where it takes
    float64. Positive shifts keep almost every pixel clear of the ReLU, which would otherwise hide an error
    wherever both results are negative."""
    g = replace(ICNET_LIKE, align_corners=align_corners)
    for seed, dtype in enumerate(dtypes_for(backend, device), start=11):
        inputs = make_inputs(g, dtype, device, seed=seed)
        inputs["shift_low"] = inputs["shift_low"].abs() + 2
        inputs["shift_high"] = inputs["shift_high"].abs() + 2
        out = run_fused(backend, inputs, g)
        exact = reference(as_float64(inputs), g)
        assert (border_slices(exact, g) > 0).float().mean() > 0.9
        if dtype == torch.float64:
            torch.testing.assert_close(border_slices(out, g), border_slices(exact, g), rtol=0, atol=1e-12)
        else:
            assert_within_budget(border_slices(out, g), border_slices(exact, g),
                                 border_slices(reference(inputs, g), g), ATOL[dtype], f"border rows/columns {dtype}")


@pytest.mark.parametrize("backend,device", backend_cases())
def test_default_scales_and_4d_weight_high(backend, device):
    """scale/shift None mean 1 and 0; weight_high [Co, Ch, 1, 1] means the same as [Co, Ch]."""
    g = Geometry(2, 3, 2, 4, 3, 4, 5, 7, 2, True)
    inputs = make_inputs(g, device=device, seed=5)
    bare = {k: inputs[k] for k in ("low", "high", "weight_low", "weight_high")}
    out = run_fused(backend, bare, g)
    unit = {**inputs, "scale_low": torch.ones(g.co, device=device), "scale_high": torch.ones(g.co, device=device),
            "shift_low": torch.zeros(g.co, device=device), "shift_high": torch.zeros(g.co, device=device)}
    assert_within_budget(out, reference(as_float64(unit), g), reference(unit, g), ATOL[torch.float32], "defaults")
    four_d = {**inputs, "weight_high": inputs["weight_high"][:, :, None, None]}
    torch.testing.assert_close(run_fused(backend, four_d, g), run_fused(backend, inputs, g), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [ICNET_LIKE, Geometry(2, 3, 2, 4, 4, 5, 9, 11, 1, False)], ids=["shortcut", "general"])
def test_return_upsampled_is_interpolate(backend, device, g):
    if backend == "triton" and device == "cpu":
        g = replace(g, n=1, cl=3, ch=2, co=4, h=3, w=4, H=5, W=7)
    inputs = make_inputs(g, device=device, seed=2)
    out, up = run_fused(backend, inputs, g, return_upsampled=True)
    torch.testing.assert_close(out, run_fused(backend, inputs, g), rtol=0, atol=0)
    expected = F.interpolate(inputs["low"], size=(g.H, g.W), mode="bilinear", align_corners=g.align_corners)
    assert torch.equal(up, expected)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [Geometry(0, 3, 2, 4, 3, 4, 5, 7, 2, True), Geometry(0, 3, 2, 4, 3, 4, 6, 6, 1, False)],
                         ids=["shortcut", "general"])
def test_empty_batch(backend, device, g):
    out = run_fused(backend, make_inputs(g, device=device), g)
    assert out.shape == (0, g.co, g.H, g.W)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [Geometry(1, 3, 2, 4, 5, 9, 9, 17, 2, True), Geometry(1, 3, 2, 4, 5, 9, 11, 13, 2, False),
                               Geometry(1, 3, 2, 4, 4, 5, 10, 20, 4, True)], ids=["shortcut", "general", "general-d4"])
@pytest.mark.parametrize("where", [(0, 0), (1, 1), (2, 3), (-1, -1)], ids=["corner", "next-to-corner", "inside", "last"])
def test_nan_in_low_propagates_like_the_reference(backend, device, g, where):
    """torch.relu(NaN) is NaN, and bilinear taps of weight 0 still carry a NaN: the reference's mask decides."""
    if backend == "triton" and device == "cpu":
        g = replace(g, n=2, cl=2, ch=2, co=2, h=3, w=4, H=5, W=7)  # batch 1 stays finite
    inputs = make_inputs(g, device=device, seed=6)
    inputs["low"][0, 1, where[0], where[1]] = float("nan")
    out = run_fused(backend, inputs, g)
    expected = reference(inputs, g)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())




NON_FINITE_CASES = {  # input, index: each input's element, and the outputs that depend on it
    "low": ((0, 1, 2, 3), lambda out: out[0]),
    "high": ((0, 1, 3, 3), lambda out: out[0, :, 3, 3]),
    "weight_low-corner-tap": ((1, 0, 0, 0), lambda out: out[:, 1]),
    "weight_low-centre-tap": ((1, 2, 1, 1), lambda out: out[:, 1]),
    "weight_high": ((1, 1), lambda out: out[:, 1]),
}
NON_FINITE_GEOMETRIES = [Geometry(2, 3, 2, 4, 5, 9, 9, 17, 2, True), Geometry(2, 3, 2, 4, 4, 5, 10, 20, 1, False),
                         Geometry(2, 3, 2, 4, 5, 6, 6, 8, 2, False)]


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", NON_FINITE_GEOMETRIES, ids=["shortcut", "tap-first-or-general", "blocked-or-general"])
@pytest.mark.parametrize("case", NON_FINITE_CASES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_non_finite_input_contract(backend, device, g, case, value):
    """The README's contract: a non-finite input changes only the outputs that depend on it (its image for
    low, its pixel for high, its output channel for a weight); all others are finite and exact. Inside that
    region, a NaN in low or high gives NaN exactly where the reference does; which outputs an inf or a NaN
    weight makes non-finite depends on the order of the kernel's sums (inf - inf, the ReLU of -inf, zero
    padding times a NaN weight, which some paths skip)."""
    if backend == "triton" and device == "cpu":
        g = replace(g, cl=3, ch=2, co=2, h=3, w=4, H=5, W=7) if g.shortcut else replace(g, cl=3, ch=2, co=2, h=3,
                                                                                           w=4, H=6, W=8)
    name = case.split("-")[0]
    index, region_of = NON_FINITE_CASES[case]
    inputs = make_inputs(g, device=device, seed=6)
    clean = {k: v.clone() for k, v in inputs.items()}
    clean[name][index] = 0.0
    inputs[name][index] = value
    out = run_fused(backend, inputs, g)
    region = torch.zeros_like(out, dtype=torch.bool)
    region_of(region).fill_(True)
    assert out[~region].isfinite().all()
    torch.testing.assert_close(out[~region], run_fused(backend, clean, g)[~region], rtol=0, atol=0)
    torch.testing.assert_close(out[~region], reference(clean, g)[~region], rtol=1e-4, atol=1e-5)
    if name in ("low", "high") and value != value:
        assert torch.equal(out.isnan(), reference(inputs, g).isnan())


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("g", [Geometry(1, 3, 2, 4, 5, 5, 6, 6, 1, False), Geometry(1, 3, 2, 4, 2, 2, 6, 6, 1, True)],
                         ids=["blocked-or-general", "tap-first-or-general"])
def test_dilation_beyond_the_map_reads_only_the_centre_tap(backend, device, g):
    """A side tap at offset +-d >= the map's extent reads only zero padding: the result is the centre tap's
    1x1 conv, and no memory is spent on the padding (a dilation of a million once exhausted the host's)."""
    inputs = make_inputs(g, device=device, seed=8)
    for dilation in (7, 50, 10**6):
        out = run_fused(backend, inputs, replace(g, dilation=dilation))
        centre = {**inputs, "weight_low": torch.zeros_like(inputs["weight_low"])}
        centre["weight_low"][:, :, 1, 1] = inputs["weight_low"][:, :, 1, 1]
        expected = reference(as_float64(centre), replace(g, dilation=1))
        assert_within_budget(out, expected, reference(centre, replace(g, dilation=1)), ATOL[torch.float32],
                             f"dilation {dilation}")
    torch.testing.assert_close(run_fused(backend, inputs, replace(g, dilation=50)),
                               reference(inputs, replace(g, dilation=50)), rtol=1e-5, atol=1e-5)
