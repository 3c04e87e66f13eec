"""A fixed list of small op calls that reaches every path of the CUDA kernels, each checked against the
float64 reference, for compute-sanitizer's memcheck (which slows every launch too much for property tests).

    compute-sanitizer --tool memcheck --kernel-name kns=icnet python scripts/memcheck_cases.py [--device cuda]

Paths (csrc/cuda/): pyramid pooling with the plane in shared memory (at most 48 KiB, and above that with
the raised dynamic limit) and streamed from global memory (a plane beyond the block's shared memory),
forward and adjoint, adaptive and explicit windows, both align_corners; cascade feature fusion's general
implicit GEMM (other zooms, align_corners=False, dilations 1 and 3) and its exact 2x shortcut, in float32
(three launches of the implicit GEMM) and in float16 and bfloat16 (cuDNN convolutions and the border
epilogue), on border geometries down to 3x3, at tile edges (64 pixels x 64 channels) and at ICNet's sub24
shape; NCHW, channels_last and strided views throughout. Prints one line per case and exits non-zero when
one fails; --device cpu runs the list on the C++ kernels (no sanitizer; --smoke: each case once), so the
list cannot rot between GPU runs.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import icnet_kernels  # noqa: E402
from benchmarks.cascade_feature_fusion import eager_cascade_feature_fusion  # noqa: E402
from benchmarks.pyramid_pool_sum import eager_pyramid_pool_sum  # noqa: E402
from icnet_kernels.reference import cascade_feature_fusion_reference, pyramid_pool_sum_reference  # noqa: E402
from icnet.model import PPM_BINS, RELEASED_PPM_KERNELS, RELEASED_PPM_STRIDES  # noqa: E402
from tests.helpers import ATOL, LAYOUTS, in_layout, within_budget  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PyramidCase:
    name: str
    shape: tuple[int, int, int, int]
    bins: tuple[int, ...] = PPM_BINS
    kernel_sizes: tuple | None = None
    strides: tuple | None = None
    align_corners: bool = True
    backward: bool = False


@dataclass(frozen=True)
class FusionCase:
    name: str
    low: tuple[int, int, int, int]
    high: tuple[int, int, int, int]
    out_channels: int
    dilation: int = 2
    align_corners: bool = True


# Shared memory per plane, float32 accumulators: H*W + 2*H*rows + rows^2 values, rows = sum(bins) = 12.
PYRAMID_CASES = (
    PyramidCase("shared-48k", (2, 3, 33, 65)),                       # 40 KiB at 65x129 would do too
    PyramidCase("shared-raised-limit", (1, 2, 129, 257)),            # 145 KiB
    PyramidCase("streamed", (1, 2, 256, 300)),                       # 332 KiB: beyond any block's limit
    PyramidCase("released-geometry", (1, 4, 33, 65), kernel_sizes=RELEASED_PPM_KERNELS, strides=RELEASED_PPM_STRIDES),
    PyramidCase("align-corners-false", (1, 3, 17, 23), align_corners=False),
    PyramidCase("tiny-bins", (1, 2, 3, 5), bins=(1, 2, 3)),
    PyramidCase("adjoint-shared", (1, 3, 33, 65), backward=True),
    PyramidCase("adjoint-streamed", (1, 1, 256, 300), backward=True),
)
FUSION_CASES = (
    FusionCase("general-align-false", (1, 5, 9, 11), (1, 7, 17, 21), 70, align_corners=False),
    FusionCase("general-other-zoom", (2, 6, 7, 9), (2, 5, 20, 17), 65),
    FusionCase("general-dilation-1", (1, 4, 9, 11), (1, 3, 17, 21), 9, dilation=1),
    FusionCase("general-dilation-3", (1, 4, 9, 11), (1, 3, 17, 21), 9, dilation=3),
    FusionCase("shortcut-tile-edges", (2, 5, 9, 11), (2, 7, 17, 21), 70),
    FusionCase("shortcut-3x3", (1, 3, 2, 2), (1, 2, 3, 3), 5),
    FusionCase("shortcut-3-rows", (1, 3, 2, 6), (1, 2, 3, 11), 5),
    FusionCase("shortcut-3-columns", (1, 3, 6, 2), (1, 2, 11, 3), 5),
    FusionCase("shortcut-sub24", (1, 256, 33, 65), (1, 256, 65, 129), 128),
)


def _budget_ok(actual: torch.Tensor, exact: torch.Tensor, same_precision: torch.Tensor) -> tuple[bool, float]:
    """The tests' budget (tests.helpers.within_budget), atol scaled by the reference's magnitude; returns
    whether it holds and the error."""
    ok, err, _ = within_budget(actual, exact, same_precision, ATOL[actual.dtype] * max(1.0, exact.abs().max().item()))
    return ok, err


def run_pyramid(case: PyramidCase, dtype: torch.dtype, layout: str, device: torch.device) -> tuple[bool, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    x = in_layout(torch.randn(case.shape, generator=generator, device=device).to(dtype), layout)
    params = {"bins": case.bins, "kernel_sizes": case.kernel_sizes, "strides": case.strides,
              "align_corners": case.align_corners}
    if not case.backward:
        out = icnet_kernels.pyramid_pool_sum(x, **params, backend="native")
        return _budget_ok(out, pyramid_pool_sum_reference(x.double(), **params), eager_pyramid_pool_sum(x, **params))
    # The adjoint kernel runs as the backward of the forward op.
    grad = torch.randn(case.shape, generator=generator, device=device).to(dtype)
    results = []
    for fn in (lambda t: icnet_kernels.pyramid_pool_sum(t, **params, backend="native"),
               lambda t: pyramid_pool_sum_reference(t, **params), lambda t: eager_pyramid_pool_sum(t, **params)):
        leaf = (x.double() if len(results) == 1 else x).detach().requires_grad_()
        fn(leaf).backward(grad.to(leaf.dtype))
        results.append(leaf.grad)
    return _budget_ok(results[0], results[1], results[2])


def run_fusion(case: FusionCase, dtype: torch.dtype, layout: str, device: torch.device) -> tuple[bool, float]:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (std * torch.randn(shape, generator=generator, device=device)).to(dtype)

    co, cl, ch = case.out_channels, case.low[1], case.high[1]
    low, high = in_layout(randn(*case.low), layout), in_layout(randn(*case.high), layout)
    weights = (randn(co, cl, 3, 3, std=(2 / (9 * cl)) ** 0.5), randn(co, ch, 1, 1, std=(2 / ch) ** 0.5),
               (0.5 + torch.rand(co, generator=generator, device=device)).to(dtype), randn(co, std=0.1),
               (0.5 + torch.rand(co, generator=generator, device=device)).to(dtype), randn(co, std=0.1))
    params = {"dilation": case.dilation, "align_corners": case.align_corners}
    out = icnet_kernels.cascade_feature_fusion(low, high, *weights, **params, backend="native")
    wl, wh, sl, bl, sh, bh = (w.double() for w in weights)
    exact = cascade_feature_fusion_reference(low.double(), high.double(), wl, sl, bl, wh, sh, bh, **params)
    return _budget_ok(out, exact, eager_cascade_feature_fusion(low, high, *weights, **params))


def all_cases(dtypes=DTYPES, layouts=LAYOUTS):
    """(name, runner, case, dtype, layout) for every combination, in passes over all cases with one dtype
    and layout each, so that a run stopped early has reached every kernel path in some dtype: float32 NCHW,
    float16 channels_last and bfloat16 strided first."""
    combos = [(dtype, layout) for dtype in dtypes for layout in layouts]
    first = list(zip(dtypes, layouts))
    for dtype, layout in first + [combo for combo in combos if combo not in first]:
        for op, run, cases in (("cascade_feature_fusion", run_fusion, FUSION_CASES),
                               ("pyramid_pool_sum", run_pyramid, PYRAMID_CASES)):
            for case in cases:
                yield f"{op}/{case.name}/{str(dtype).removeprefix('torch.')}/{layout}", run, case, dtype, layout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="each case once, float32 on a strided view: checks the list itself quickly")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and icnet_kernels.native_cuda_available()):
        print("memcheck cases: needs a GPU and the extension built with CUDA", file=sys.stderr)
        return 2
    # Outputs start as NaN, so an element a kernel never writes fails its comparison.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    failures = 0
    chosen = all_cases((torch.float32,), ("strided",)) if args.smoke else all_cases()
    for name, run, case, dtype, layout in chosen:
        start = time.perf_counter()
        try:
            ok, err = run(case, dtype, layout, device)
            line = f"{'ok' if ok else 'FAIL'} {name} max_abs_err={err:.3g}"
        except Exception as exc:  # every case runs, and the failure is named
            ok, line = False, f"FAIL {name} {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if device.type == "cuda":
            torch.cuda.synchronize()
        failures += not ok
        print(f"{line} ({time.perf_counter() - start:.2f} s)", flush=True)
    print(f"memcheck cases: {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
