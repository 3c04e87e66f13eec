"""Every code path of the CPU kernels, and of the Triton kernels interpreted on the CPU, by a fixed case
built to reach it, against the float64 reference, under 1, 2 and 3 threads (the interpreted Triton
kernels, which do not depend on the thread count, under one).

The random tests reach some paths only by luck: the CPU CFF kernel's blocked general path, for instance,
runs only where low has more than half of high's pixels, and whether its last row block is partial depends
on the thread count (blocks are sized so that every thread gets work). Here each case names the
path it is for, and the CPU cases check that they took it, from the kernels' profiler ranges and the
shapes of the convolutions they call (the main thread's share of the work: it always runs the first task):

    shortcut-winograd   exact 2x zoom, dilation 2; the low-resolution conv by Winograd (float32, small maps)
    shortcut-direct     the same with ATen's direct conv (float64, 16-bit dtypes, or float32 past 16 MiB)
    tap-first           any other geometry where low has at most half of high's pixels
    blocked             the rest: row blocks of the upsampled map, convolved block by block

Pyramid pooling has one CPU path whose branches are the memory layout (unit or other strides of the input
and of the output), the tail of its four-rows-together expansion (H not a multiple of 4), the pooling
geometry (adaptive, explicit with gaps or overlaps, up to eight bins) and the direction (forward, and the
adjoint that its backward runs). The Triton kernels' branches are their partial tiles (16 x 16 x 16 in the
interpreter), the resize / no-resize taps, the shortcut's three launches and its border pixel list.
"""

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import icnet_kernels
from icnet_kernels import cascade_feature_fusion, cascade_feature_fusion_reference, pyramid_pool_sum
from icnet_kernels import pyramid_pool_sum_reference
from icnet.model import RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES
from tests.cascade_feature_fusion_cases import Geometry
from tests.helpers import ATOL, assert_within_budget, in_layout

NATIVE = icnet_kernels.native_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="_C not built")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton is interpreted only on CPU-only machines")

@pytest.fixture(params=(1, 2, 3), ids=lambda t: f"{t}threads")
def threads(request):
    """Runs the test under this many intra-op threads, restoring the count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """The interpreted Triton kernels do not depend on the thread count: one setting is enough."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# cascade feature fusion

@dataclass(frozen=True)
class Cff(Geometry):
    """A fixed CFF case: its geometry, the path it is built to reach, and why."""
    kernel_path: str = ""
    why: str = ""
    partial_block: bool = False  # blocked path: the last row block is partial under every thread count tested

    def __str__(self):
        return (f"{self.kernel_path}: {self.why} (n={self.n} cl={self.cl} ch={self.ch} co={self.co} "
                f"{self.h}x{self.w}->{self.H}x{self.W} d={self.dilation} ac={int(self.align_corners)})")


def cff(kernel_path: str, why: str, *geometry, partial_block: bool = False) -> Cff:
    """Cff from the path, the reason and the Geometry fields in order (n, cl, ch, co, h, w, H, W, dilation,
    align_corners)."""
    return Cff(*geometry, kernel_path=kernel_path, why=why, partial_block=partial_block)


CPU_CFF = [
    cff("shortcut-winograd", "3x3 map: rows 1 and H-2, columns 1 and W-2 coincide", 1, 3, 2, 5, 2, 2, 3, 3, 2, True),
    cff("shortcut-winograd", "H = 3 only", 1, 2, 3, 4, 2, 6, 3, 11, 2, True),
    cff("shortcut-winograd", "W = 3 only", 2, 2, 1, 3, 5, 2, 9, 3, 2, True),
    cff("shortcut-winograd", "odd low map, channels off the 16-channel blocks, batch 2", 2, 17, 5, 18, 5, 7, 9, 13,
        2, True),
    cff("shortcut-direct", "float32 past Winograd's 16 MiB of transformed data", 1, 4, 2, 4, 363, 363, 725, 725,
        2, True),
    cff("tap-first", "one partial block of output channels", 1, 3, 2, 5, 3, 4, 7, 9, 2, True),
    cff("tap-first", "two output-channel blocks, the last partial, batch 2", 2, 3, 2, 20, 4, 5, 9, 11, 1, False),
    cff("tap-first", "dilation past the map", 1, 2, 2, 3, 2, 3, 4, 7, 5, True),
    cff("tap-first", "exact 2x zoom without align_corners", 1, 3, 2, 4, 4, 5, 7, 9, 2, False),
    cff("tap-first", "exact 2x zoom at dilation 3", 1, 3, 2, 4, 4, 4, 7, 7, 3, True),
    cff("tap-first", "no resize along y", 1, 3, 2, 4, 6, 3, 6, 9, 2, True),
    cff("tap-first", "exactly half of high's pixels", 1, 3, 2, 4, 2, 4, 4, 4, 1, False),
    cff("tap-first", "1x1 low map", 2, 2, 3, 3, 1, 1, 4, 5, 2, True),
    cff("blocked", "last row block partial", 1, 3, 2, 5, 5, 3, 7, 3, 2, True, partial_block=True),
    cff("blocked", "the random search's 3x1 -> 5x1", 1, 2, 2, 3, 3, 1, 5, 1, 2, True),
    cff("blocked", "batch 2, blocks across images", 2, 3, 2, 4, 5, 4, 7, 5, 2, False),
    cff("blocked", "rows per block capped by the cache (W = 1500)", 1, 2, 2, 3, 5, 800, 5, 1500, 2, True),
    cff("blocked", "no resize at all", 2, 3, 3, 4, 6, 7, 6, 7, 1, True),
    cff("blocked", "dilation past the map", 1, 2, 2, 3, 4, 4, 5, 5, 6, True),
    cff("blocked", "non-integer ratio without align_corners", 1, 3, 2, 4, 5, 6, 6, 8, 2, False),
    cff("blocked", "one row", 1, 2, 2, 3, 1, 5, 1, 7, 2, True),
    cff("blocked", "1x1 maps", 1, 2, 2, 3, 1, 1, 1, 1, 2, True),
]


def cff_inputs(c: Cff, dtype, seed=0):
    """The eight inputs in float64 rounded to dtype, weights scaled by 1/sqrt(fan-in) so outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return {"low": randn(c.n, c.cl, c.h, c.w), "high": randn(c.n, c.ch, c.H, c.W),
            "weight_low": randn(c.co, c.cl, 3, 3, scale=(9 * c.cl) ** -0.5),
            "weight_high": randn(c.co, c.ch, scale=c.ch ** -0.5),
            "scale_low": randn(c.co), "shift_low": randn(c.co, scale=0.5),
            "scale_high": randn(c.co), "shift_high": randn(c.co, scale=0.5)}


def cff_reference(inputs, c: Cff):
    return cascade_feature_fusion_reference(
        inputs["low"], inputs["high"], inputs["weight_low"], inputs["scale_low"], inputs["shift_low"],
        inputs["weight_high"], inputs["scale_high"], inputs["shift_high"], c.dilation, c.align_corners)


def check_cff(backend, c: Cff, dtype, layout, seed=0):
    inputs = cff_inputs(c, dtype, seed)
    laid = {**inputs, "low": in_layout(inputs["low"], layout), "high": in_layout(inputs["high"], layout)}
    out = cascade_feature_fusion(**laid, dilation=c.dilation, align_corners=c.align_corners, backend=backend)
    assert out.shape == (c.n, c.co, c.H, c.W) and out.dtype == dtype
    exact = cff_reference({k: v.double() for k, v in inputs.items()}, c)
    assert_within_budget(out, exact, cff_reference(inputs, c), ATOL[dtype], f"{backend} {dtype} {layout} {c}")


def observed_cff_path(c: Cff):
    """(path, rows of the first row block or None) that the CPU kernel took on c, from a profile of one call.

    The first convolution is the 1x1 projection of high; the tap-first path then mixes channels with 1x1
    convolutions of one image of low ([9 x a block of output channels, Cl, 1, 1]), the blocked path convolves
    row blocks of up(low) with the 3x3 weight (or the taps of it that reach the map), each block's input
    holding its rows plus the taps' halo."""
    inputs = cff_inputs(c, torch.float32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        cascade_feature_fusion(**inputs, dilation=c.dilation, align_corners=c.align_corners, backend="native")
    names = {e.name for e in prof.events()}
    if "icnet::cff_shortcut_pass" in names:
        return ("shortcut-winograd" if "icnet::winograd_input_transform" in names else "shortcut-direct"), None
    convs = [e.input_shapes[:2] for e in prof.events() if e.name == "aten::conv2d"][1:]
    if any(x == [1, c.cl, c.h, c.w] and wt[2:] == [1, 1] and wt[0] % 9 == 0 for x, wt in convs):
        return "tap-first", None
    blocks = [(x, wt) for x, wt in convs if x[:2] == [1, c.cl] and wt[:2] == [c.co, c.cl]]
    if blocks:
        x, wt = blocks[0]
        return "blocked", x[2] - (wt[2] - 1) * c.dilation
    return "unknown", None


@needs_native
@pytest.mark.parametrize("c", CPU_CFF, ids=str)
def test_cff_cpu_path(c: Cff, threads):
    path, rows = observed_cff_path(c)
    assert path == c.kernel_path, f"{c} took the {path} path"
    if c.partial_block:
        assert c.H % rows != 0, f"{c}: {rows} rows per block divide H under {threads} threads"
    if c.H * c.W > 100_000:  # the large map is there for its path alone
        runs = [(torch.float32, "contiguous")]
    else:
        runs = [(torch.float32, "contiguous"), (torch.float32, "channels_last"), (torch.float32, "strided"),
                (torch.float64, "contiguous"), (torch.float16, "channels_last"), (torch.bfloat16, "contiguous")]
    for seed, (dtype, layout) in enumerate(runs):
        check_cff("native", c, dtype, layout, seed)


TRITON_CFF = [
    cff("general", "partial pixel and channel tiles, two K blocks of low and of high", 1, 17, 17, 17, 3, 4, 5, 7, 1,
        False),
    cff("general", "no resize (one source per tap), batch 2", 2, 3, 2, 5, 4, 5, 4, 5, 2, True),
    cff("general", "align_corners, dilation past the map", 1, 2, 3, 3, 2, 3, 4, 6, 5, True),
    cff("shortcut", "partial tiles, two channel tiles, the border GEMMs over two K blocks", 1, 17, 3, 17, 4, 5, 7, 9,
        2, True),
    cff("shortcut", "batch 2", 2, 2, 3, 3, 3, 4, 5, 7, 2, True),
    cff("shortcut", "3x3 map: every pixel but the corners is a border pixel", 1, 3, 2, 4, 2, 2, 3, 3, 2, True),
    cff("shortcut", "H = 3 only: row 1 is row H-2, both row corrections apply", 1, 2, 2, 3, 2, 6, 3, 11, 2, True),
    cff("shortcut", "W = 3 only: column 1 is column W-2", 1, 2, 2, 3, 5, 2, 9, 3, 2, True),
    cff("shortcut", "rows longer than a tile, columns shorter: idle border programs", 1, 2, 2, 3, 3, 10, 5, 19, 2,
        True),
    cff("shortcut", "columns longer than a tile, rows shorter", 1, 2, 2, 3, 17, 2, 33, 3, 2, True),
]


@needs_interpreter
@pytest.mark.parametrize("c", TRITON_CFF, ids=str)
def test_cff_triton_path(c: Cff, one_thread):
    shortcut = c.align_corners and c.dilation == 2 and (c.H, c.W) == (2 * c.h - 1, 2 * c.w - 1)
    assert shortcut == (c.kernel_path == "shortcut"), f"{c} is not on its path"
    # the interpreter runs every program in Python: the wide cases skip the strided view the others cover
    layouts = ("contiguous", "channels_last") if c.cl > 16 else ("contiguous", "channels_last", "strided")
    for seed, layout in enumerate(layouts):
        check_cff("triton", c, torch.float32, layout, seed)


def test_triton_offsets_widen_where_an_image_spans_2_to_the_31_elements():
    """In-image offsets are int32 unless some tensor's batch item spans 2^31 elements (strides included)."""
    pytest.importorskip("triton")
    from icnet_kernels.triton.index_math import image_span, needs_wide_index
    narrow = torch.empty_strided((4, 2, 3, 5), (2**33, 15, 5, 1), device="meta")  # only the batch stride is large
    assert image_span(narrow) == 30 and not needs_wide_index((narrow, None))
    wide = torch.empty_strided((1, 2, 3, 5), (2**31, 2**31 - 15, 5, 1), device="meta")
    assert image_span(wide) == 2**31 and needs_wide_index((narrow, wide))
    assert needs_wide_index((narrow,), (torch.empty(2**31, device="meta"),))


@needs_interpreter
@pytest.mark.parametrize("c", [c for c in TRITON_CFF if c.kernel_path == "shortcut"][:1] + TRITON_CFF[:1], ids=str)
def test_cff_triton_wide_offsets_give_the_same_result(c: Cff, one_thread, monkeypatch):
    """The int64 offsets (WIDE), which only an image of 2^31 elements reaches, compute what int32 ones do."""
    from icnet_kernels.triton import cascade_feature_fusion as cff_kernel, cff_shortcut_border
    inputs = cff_inputs(c, torch.float32, seed=3)
    run = lambda: cascade_feature_fusion(**inputs, dilation=c.dilation, align_corners=c.align_corners,  # noqa: E731
                                         backend="triton")
    narrow = run()
    asked = []
    for module in (cff_kernel, cff_shortcut_border):
        monkeypatch.setattr(module, "needs_wide_index", lambda *args, module=module: asked.append(module) or True)
    torch.testing.assert_close(run(), narrow, rtol=0, atol=0)
    assert cff_kernel in asked and (cff_shortcut_border in asked) == (c.kernel_path == "shortcut")


# ---------------------------------------------------------------------------------------------------------------
# summed pyramid pooling

@dataclass(frozen=True)
class Pyramid:
    why: str
    shape: tuple
    bins: tuple
    kernel_sizes: tuple | None = None
    strides: tuple | None = None
    align_corners: bool = True

    def __str__(self):
        geometry = "adaptive" if self.kernel_sizes is None else f"k={self.kernel_sizes} s={self.strides}"
        return f"{self.why} ({'x'.join(map(str, self.shape))} bins={self.bins} {geometry} ac={int(self.align_corners)})"


CPU_PYRAMID = [
    Pyramid("H = 7: a partial group of four rows, uneven adaptive windows", (2, 3, 7, 10), (1, 2, 3, 6)),
    Pyramid("H < 4: one partial group", (1, 2, 3, 5), (1, 3), align_corners=False),
    Pyramid("H a multiple of 4", (1, 2, 8, 9), (1, 2, 4, 8)),
    Pyramid("the released ICNet's explicit geometry", (1, 3, 33, 65), (1, 2, 3, 6),
            RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES),
    Pyramid("explicit windows with gaps (bin 2) and overlaps (bin 3)", (1, 2, 10, 11), (2, 3),
            ((2, 4), (4, 5)), ((5, 6), (3, 3)), align_corners=False),
    Pyramid("eight bins, the largest as wide as the map", (1, 2, 8, 8), (1, 2, 3, 4, 5, 6, 7, 8)),
    Pyramid("1x1 map", (2, 3, 1, 1), (1,)),
    Pyramid("one row", (1, 2, 1, 9), (1,), align_corners=False),
    Pyramid("one column", (1, 2, 9, 1), (1,)),
    Pyramid("more planes than threads", (3, 7, 6, 5), (1, 2, 3)),
]

# name -> (lay out x, whether the input's and the output's last stride is 1)
PYRAMID_LAYOUTS = {
    "contiguous": (lambda x: x.contiguous(), True, True),
    "channels_last": (lambda x: x.contiguous(memory_format=torch.channels_last), False, False),
    "transposed planes": (lambda x: x.transpose(2, 3).contiguous().transpose(2, 3), False, False),
    "every other column": (lambda x: torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2],
                           False, True),
}


def pyramid_call(p: Pyramid, x, backend):
    return pyramid_pool_sum(x, p.bins, p.kernel_sizes, p.strides, p.align_corners, backend=backend)


def pyramid_reference(p: Pyramid, x):
    return pyramid_pool_sum_reference(x, p.bins, p.kernel_sizes, p.strides, p.align_corners)


def composed_pyramid(p: Pyramid, x):
    """The same-precision composition of pooling, interpolate and add."""
    out = x
    for i, n in enumerate(p.bins):
        pooled = (F.adaptive_avg_pool2d(x, n) if p.kernel_sizes is None
                  else F.avg_pool2d(x, p.kernel_sizes[i], p.strides[i]))
        out = out + F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=p.align_corners)
    return out


def check_pyramid(backend, p: Pyramid, dtype, layout, seed):
    arrange, unit_in, unit_out = PYRAMID_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    x = arrange(x64.to(dtype))
    c, w = p.shape[1], p.shape[3]
    if c > 1 and w > 1 and p.shape[2] > 1:  # elsewhere every layout has unit strides
        assert (x.stride(3) == 1) == unit_in, f"{layout}: input strides {x.stride()}"
    what = f"{backend} {dtype} {layout} {p}"

    out = pyramid_call(p, x, backend)
    if c > 1 and w > 1 and p.shape[2] > 1:
        assert (out.stride(3) == 1) == unit_out, f"{what}: output strides {out.stride()}"
    assert_within_budget(out, pyramid_reference(p, x64), composed_pyramid(p, x.contiguous()), ATOL[dtype], what)

    # the backward runs the adjoint (pooling and resize matrices swapped) on the incoming gradient's layout
    grad_out64 = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    leaf = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(pyramid_call(p, leaf, backend), leaf, arrange(grad_out64.to(dtype)))
    leaf64 = x64.clone().requires_grad_()
    (exact,) = torch.autograd.grad(pyramid_reference(p, leaf64), leaf64, grad_out64)
    leaf_same = x.detach().contiguous().requires_grad_()
    (same,) = torch.autograd.grad(composed_pyramid(p, leaf_same), leaf_same, grad_out64.to(dtype))
    assert_within_budget(grad, exact, same, ATOL[dtype], f"backward {what}")


@needs_native
@pytest.mark.parametrize("p", CPU_PYRAMID, ids=str)
def test_pyramid_cpu_path(p: Pyramid, threads):
    runs = [(torch.float32, layout) for layout in PYRAMID_LAYOUTS] + [
        (torch.float64, "contiguous"), (torch.float16, "channels_last"), (torch.bfloat16, "transposed planes")]
    for seed, (dtype, layout) in enumerate(runs):
        check_pyramid("native", p, dtype, layout, seed)


@needs_native
def test_pyramid_cpu_empty_batch(threads):
    x = torch.randn(0, 3, 5, 6)
    assert pyramid_pool_sum(x, (1, 2), backend="native").shape == x.shape


TRITON_PYRAMID = [
    Pyramid("two H tiles and two W tiles, both partial (32 x 128 tiles)", (1, 2, 35, 130), (1, 2, 3, 6)),
    Pyramid("21 pooled rows: a 32-row block", (1, 1, 9, 12), (1, 2, 3, 4, 5, 6)),
    Pyramid("a map smaller than one tile, explicit geometry", (2, 2, 5, 7), (1, 2), ((5, 7), (3, 4)),
            ((5, 7), (2, 3)), align_corners=False),
    Pyramid("the released ICNet's explicit geometry", (1, 1, 33, 65), (1, 2, 3, 6),
            RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES),
]


@needs_interpreter
@pytest.mark.parametrize("p", TRITON_PYRAMID, ids=str)
def test_pyramid_triton_path(p: Pyramid, one_thread):
    for seed, layout in enumerate(("contiguous", "channels_last", "transposed planes")):
        check_pyramid("triton", p, torch.float32, layout, seed)
