"""Cascade feature fusion in Triton: one implicit GEMM per output tile.

A program computes a [BLOCK_M pixels x BLOCK_N output channels] tile of
    relu(conv3x3_dil(up(low)) + weight_high . high + bias)
with the reduction running over the nine dilated taps of up(low) (each A tile interpolated on the fly
from low's four bilinear sources: the upsampled map is never written) and then over high's channels.
Tensor cores serve float16/bfloat16 (float32 accumulation); float32 runs at full precision.

For ICNet's exact 2x zoom with dilation 2 (csrc/common/cff_geometry.h) the op is two GEMMs and one
epilogue: the same kernel runs the 3x3 conv at low resolution, then the full-resolution pass, the projection
GEMM whose epilogue adds the bilinear gather of that conv, the border rows' and columns' corrections (small
GEMMs over low's edges, icnet_kernels.triton.cff_shortcut_border), the bias and the ReLU.
"""

import os

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted
from icnet_kernels.cff_geometry import exact_shortcut, output_memory_format
from icnet_kernels.triton.cff_shortcut_border import shortcut_border_corrections
from icnet_kernels.triton.index_math import (batch_slices, in_image_index, launch_grid, needs_wide_index, resize_scale,
                                            source_index)
from icnet_kernels.triton.weight_layout import laid_out


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per dtype ("half": float16/bfloat16 on tensor cores;
# "float": float32, whose full-precision dot Triton unrolls into scalar FMAs, so its tiles are small) and per
# pass: "taps", the passes that reduce over the 3x3 taps, and "gather", the shortcut's full-resolution pass,
# whose epilogue (four gathered sources of the low-resolution conv, the border corrections) fits in the
# registers only with few output elements per thread (tests/test_triton_ahead_of_time.py checks for spills).
# Each list's first tile is the one an untuned build runs.
TILES = {
    ("half", "taps"): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4),
                       (64, 64, 64, 4, 3)],
    ("half", "gather"): [(64, 64, 32, 8, 3), (32, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("float", "taps"): [(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)],
    ("float", "gather"): [(32, 64, 16, 8, 2), (32, 32, 16, 4, 2)],
}


def _tile(config: triton.Config) -> tuple[int, int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
            config.num_stages)


def _config(tile: tuple[int, int, int, int, int]) -> triton.Config:
    bm, bn, bk, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)


def _configs():
    """Every tile the autotuner may try."""
    return [_config(tile) for tile in dict.fromkeys(tile for tiles in TILES.values() for tile in tiles)]


def _tuning() -> bool:
    """Whether launches are autotuned. ICNET_TRITON_AUTOTUNE=0 (the test suite sets it: each new shape would
    otherwise compile and time every tile) and the interpreter run a fixed tile instead."""
    return os.environ.get("ICNET_TRITON_AUTOTUNE", "1") != "0" and not triton_interpreted()


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype == torch.float32 else "half"


def _untuned_config(dtype: torch.dtype, gather: bool) -> triton.Config:
    """The tile of an untuned launch: the first of its dtype's and pass's list (one small tile when
    interpreted). Launched without the autotuner, which in some Triton versions times even a single tile."""
    if triton_interpreted():
        return triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)
    return _config(TILES[_kind(dtype), "gather" if gather else "taps"][0])


def _tiles_for_pass(configs, named_args, **kwargs):
    """Prunes the tile list to the tiles of the launch's dtype and pass (TILES)."""
    wanted = TILES[_kind(named_args["low_ptr"].dtype), "gather" if kwargs.get("ADD_GATHER") else "taps"]
    return [c for c in configs if _tile(c) in wanted] or configs


# Sizes are not specialised on, so a new image size reuses the compiled kernels; strides are (a multiple of
# 16 or not), which lets channels_last tiles load and store 16 bytes at a time.
@triton.jit(do_not_specialize=["h", "w", "H", "W", "num_pixels", "dilation"])
def _cascade_feature_fusion_fwd_kernel(
    low_ptr, high_ptr, w_low_ptr, w_high_ptr, bias_ptr, gather_ptr, corr_ptr, out_ptr,
    Cl, h, w, Ch, H, W, Co, num_pixels, dilation, scale_y, scale_x, zoom_y, zoom_x,
    s_ln, s_lc, s_ly, s_lx, s_hn, s_hc, s_hy, s_hx, s_gn, s_gc, s_gy, s_gx, s_cn, s_cc, s_ce,
    s_on, s_oc, s_oy, s_ox,
    ALIGN: tl.constexpr, RESIZE: tl.constexpr, HAS_TAPS: tl.constexpr, HAS_PROJ: tl.constexpr,
    ADD_GATHER: tl.constexpr, ADD_BORDER: tl.constexpr, EPILOGUE: tl.constexpr, WIDE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)  # the batch offset is the one product that may pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_pixels
    y = in_image_index(offs_m // W, WIDE)
    x = in_image_index(offs_m % W, WIDE)
    offs_n = in_image_index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    n_ok = offs_n < Co
    dot_dtype = low_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_TAPS:
        # One reduction loop over (tap, channel block) pairs: a single loop body for the compiler to
        # pipeline, where nine unrolled loops made the kernel nine times larger.
        low_n = low_ptr + n * s_ln
        k_blocks = tl.cdiv(Cl, BLOCK_K)
        for step in range(0, 9 * k_blocks):
            tap = step // k_blocks
            cs = in_image_index((step - tap * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K), WIDE)
            ys = y + (tap // 3 - 1) * dilation
            xs = x + (tap % 3 - 1) * dilation
            inside = m_ok & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            ys = tl.minimum(tl.maximum(ys, 0), H - 1)
            xs = tl.minimum(tl.maximum(xs, 0), W - 1)
            a_mask = inside[:, None] & (cs < Cl)[None, :]
            channel = low_n + cs[None, :] * s_lc
            if RESIZE:
                y0, y1, ly = source_index(ys, h, scale_y, ALIGN)
                x0, x1, lx = source_index(xs, w, scale_x, ALIGN)
                a = (((1.0 - ly) * (1.0 - lx))[:, None]
                     * tl.load(channel + (y0 * s_ly + x0 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32)
                     + ((1.0 - ly) * lx)[:, None]
                     * tl.load(channel + (y0 * s_ly + x1 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32)
                     + (ly * (1.0 - lx))[:, None]
                     * tl.load(channel + (y1 * s_ly + x0 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32)
                     + (ly * lx)[:, None]
                     * tl.load(channel + (y1 * s_ly + x1 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32))
            else:  # one source per tap: a plain load (no zero-weighted neighbour whose NaN would leak)
                a = tl.load(channel + (ys * s_ly + xs * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32)
            b = tl.load(w_low_ptr + (tap * Cl + cs)[:, None] * Co + offs_n[None, :],
                        mask=(cs < Cl)[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a.to(dot_dtype), b, input_precision=PRECISION)

    if HAS_PROJ:
        pixel_offset = (y * s_hy + x * s_hx)[:, None]
        high_n = high_ptr + n * s_hn
        for c0 in range(0, Ch, BLOCK_K):
            cs = in_image_index(c0 + tl.arange(0, BLOCK_K), WIDE)
            a = tl.load(high_n + cs[None, :] * s_hc + pixel_offset,
                        mask=m_ok[:, None] & (cs < Ch)[None, :], other=0.0)
            b = tl.load(w_high_ptr + cs[:, None] * Co + offs_n[None, :], mask=(cs < Ch)[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)

    tile_ok = m_ok[:, None] & n_ok[None, :]
    if ADD_GATHER:  # bilinear gather of the low-resolution conv (exact 2x zoom, align_corners)
        y0, y1, ly = source_index(y, h, zoom_y, True)
        x0, x1, lx = source_index(x, w, zoom_x, True)
        g = gather_ptr + n * s_gn + offs_n[None, :] * s_gc
        acc += ((1.0 - ly) * (1.0 - lx))[:, None] * tl.load(g + (y0 * s_gy + x0 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += ((1.0 - ly) * lx)[:, None] * tl.load(g + (y0 * s_gy + x1 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += (ly * (1.0 - lx))[:, None] * tl.load(g + (y1 * s_gy + x0 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += (ly * lx)[:, None] * tl.load(g + (y1 * s_gy + x1 * s_gx)[:, None], mask=tile_ok, other=0.0)

    if ADD_BORDER:  # the shortcut's corrections (icnet_kernels.triton.cff_shortcut_border): one load per axis
        c = corr_ptr + n * s_cn + offs_n[None, :] * s_cc
        on_row = (y == 1) | (y == H - 2)
        acc += tl.load(c + (tl.where(y == 1, x, W + x) * s_ce)[:, None], mask=tile_ok & on_row[:, None], other=0.0)
        on_column = (x == 1) | (x == W - 2)
        acc += tl.load(c + (tl.where(x == 1, 2 * W + y, 2 * W + H + y) * s_ce)[:, None],
                       mask=tile_ok & on_column[:, None], other=0.0)

    if EPILOGUE:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN, as torch.relu does
    out = out_ptr + n * s_on + offs_n[None, :] * s_oc + (y * s_oy + x * s_ox)[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


# Tuned per channel counts and pass (the dtype joins the key by itself).
_cascade_feature_fusion_fwd_tuned = triton.autotune(
    configs=_configs(), key=["Cl", "Ch", "Co", "HAS_TAPS", "HAS_PROJ", "ADD_GATHER"],
    prune_configs_by={"early_config_prune": _tiles_for_pass})(_cascade_feature_fusion_fwd_kernel)


def _items(t: torch.Tensor | None, items: slice) -> torch.Tensor | None:
    return None if t is None else t[items]


def _launch(low, high, w_low, w_high, bias, gather, corr, out, *, resize_to, dilation, align_corners,
            taps, proj, epilogue):
    n, co, height, width = out.shape
    cl, h, w = low.shape[1:]
    num_pixels = height * width
    ch = high.shape[1] if high is not None else 0
    kernel, tile = _cascade_feature_fusion_fwd_tuned, {}
    if not _tuning():
        kernel, tile = _cascade_feature_fusion_fwd_kernel, _untuned_config(low.dtype, gather is not None).all_kwargs()
    constants = dict(
        ALIGN=align_corners, RESIZE=(h, w) != tuple(resize_to), HAS_TAPS=taps, HAS_PROJ=proj,
        ADD_GATHER=gather is not None, ADD_BORDER=corr is not None, EPILOGUE=epilogue,
        WIDE=needs_wide_index((low, high, gather, corr, out), (w_low, w_high)),
        PRECISION="ieee" if low.dtype == torch.float32 else "tf32", **tile)
    for items in batch_slices(n):
        low_i, high_i, gather_i, corr_i, out_i = (_items(t, items) for t in (low, high, gather, corr, out))
        grid = lambda meta, batch=out_i.shape[0]: launch_grid(  # noqa: E731
            "cascade_feature_fusion", (triton.cdiv(num_pixels, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"]),
                                       batch), ("output pixels", "output channels", "batch items"))
        dummy = out_i  # stands in for absent operands; never read
        kernel[grid](
            low_i, high_i if high is not None else dummy, w_low, w_high if w_high is not None else dummy,
            bias if bias is not None else dummy, gather_i if gather is not None else dummy,
            corr_i if corr is not None else dummy, out_i,
            cl, h, w, ch, height, width, co, num_pixels, dilation,
            resize_scale(h, resize_to[0], align_corners), resize_scale(w, resize_to[1], align_corners),
            resize_scale(h, height, True), resize_scale(w, width, True),
            *low.stride(), *(high.stride() if high is not None else (0, 0, 0, 0)),
            *(gather.stride() if gather is not None else (0, 0, 0, 0)),
            *(corr.stride() if corr is not None else (0, 0, 0)), *out.stride(), **constants,
        )


def _taps_by_out_channels(weight_low: torch.Tensor) -> torch.Tensor:
    """[Co, Cl, 3, 3] as the GEMM's [9 * Cl, Co], tap-major."""
    co, cl = weight_low.shape[:2]
    return weight_low.permute(2, 3, 1, 0).reshape(9 * cl, co).contiguous()


def cascade_feature_fusion_triton(low, high, weight_low, weight_high, bias, dilation: int, align_corners: bool):
    """relu(conv3x3_dil(up(low), weight_low) + weight_high . high + bias); weights already BN-folded."""
    n, cl, h, w = low.shape
    _, ch, height, width = high.shape
    co = weight_low.shape[0]
    out = torch.empty((n, co, height, width), dtype=low.dtype, device=low.device,
                      memory_format=output_memory_format(high))
    if out.numel() == 0:
        return out
    w_low = laid_out(weight_low, "taps_by_out_channels", _taps_by_out_channels)
    w_high = laid_out(weight_high, "transposed", lambda t: t.t().contiguous())  # Ch x Co
    if not exact_shortcut(h, w, height, width, dilation, align_corners):
        _launch(low, high, w_low, w_high, bias, None, None, out, resize_to=(height, width), dilation=dilation,
                align_corners=align_corners, taps=True, proj=True, epilogue=True)
        return out
    # the shortcut: the conv at low resolution and the border corrections, then one pass over the output
    # (projection GEMM, gather of the conv, corrections, bias, ReLU); both intermediates in out's layout
    layout = output_memory_format(high)
    conv_low = torch.empty((n, co, h, w), dtype=torch.float32, device=low.device, memory_format=layout)
    _launch(low, None, w_low, None, None, None, None, conv_low, resize_to=(h, w), dilation=1, align_corners=True,
            taps=True, proj=False, epilogue=False)
    corr = shortcut_border_corrections(low, w_low, height, width, layout == torch.channels_last)
    _launch(low, high, w_low, w_high, bias, conv_low, corr, out, resize_to=(height, width), dilation=dilation,
            align_corners=True, taps=False, proj=True, epilogue=True)
    return out
