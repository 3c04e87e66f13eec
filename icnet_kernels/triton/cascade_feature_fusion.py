"""Cascade feature fusion in Triton: one implicit GEMM per output tile.

A program computes a [BLOCK_M pixels x BLOCK_N output channels] tile of
    relu(conv3x3_dil(up(low)) + weight_high . high + bias)
with the reduction running over the nine dilated taps of up(low) (each A tile interpolated on the fly
from low's four bilinear sources: the upsampled map is never written) and then over high's channels.
Tensor cores serve float16/bfloat16 (float32 accumulation); float32 runs at full precision.

For ICNet's exact 2x zoom with dilation 2 (csrc/common/cff_geometry.h) the same kernel runs three times:
the 3x3 conv at low resolution; the full-resolution pass (projection GEMM plus a bilinear gather of that
conv, bias and ReLU) for all pixels but the border rows/columns; and the direct conv for those.
"""

import os

import torch
import triton
import triton.language as tl

from icnet_kernels.cff_geometry import border_count, exact_shortcut, output_memory_format
from icnet_kernels.triton.weight_layout import laid_out


# Tiles for float16/bfloat16 (tensor cores) and for float32. float32 runs the dot at full precision
# ("ieee"), which Triton unrolls into scalar FMAs: large tiles there compile slowly and spill registers, so
# float32 gets small ones.
_HALF_TILES = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 4),
               (64, 64, 64, 4, 3)]
_FLOAT_TILES = [(64, 64, 16, 4, 2), (32, 64, 16, 4, 2)]


def _configs():
    """Every tile the autotuner may try. ICNET_TRITON_AUTOTUNE=0 keeps the first tile of each dtype only
    (the test suite sets it: each new shape would otherwise compile and time every tile)."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter: one small tile, no tuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    tune = os.environ.get("ICNET_TRITON_AUTOTUNE", "1") != "0"
    tiles = (_HALF_TILES if tune else _HALF_TILES[:1]) + (_FLOAT_TILES if tune else _FLOAT_TILES[:1])
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _tiles_for_dtype(configs, named_args, **kwargs):
    """Prunes the tile list to the dtype's own tiles (float32 or the 16-bit types)."""
    wanted = _FLOAT_TILES if named_args["low_ptr"].dtype == torch.float32 else _HALF_TILES
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) in wanted]
    return kept or configs


@triton.jit
def _source_index(dst, in_size, scale, ALIGN: tl.constexpr):
    """Bilinear source (i0, i1, weight of i1) in PyTorch's arithmetic, as csrc/common/resize.h."""
    if ALIGN:
        src = dst.to(tl.float32) * scale
    else:
        src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam


# Tuned per channel counts and pass (the dtype joins the key by itself); sizes and row/batch strides are not
# specialised on, so a new image size reuses the compiled kernels.
@triton.jit
def _border_pixel(p, H, W):
    """(y, x) of the p-th border pixel of the shortcut: cff_border_pixel of csrc/common/cff_geometry.h, the
    rows 1 and H-2 first, then columns 1 and W-2 of every other row."""
    rows = tl.where(H - 2 != 1, 2, 1)
    cols = tl.where(W - 2 != 1, 2, 1)
    in_rows = p < rows * W
    q = p - rows * W
    y_other = q // cols
    y_other = tl.where(y_other >= 1, y_other + 1, y_other)
    y_other = tl.where((rows == 2) & (y_other >= H - 2), y_other + 1, y_other)
    y = tl.where(in_rows, tl.where(p // W == 0, 1, H - 2), y_other)
    x = tl.where(in_rows, p % W, tl.where(q % cols == 0, 1, W - 2))
    return y, x


@triton.autotune(configs=_configs(), key=["Cl", "Ch", "Co", "HAS_TAPS", "HAS_PROJ", "BORDER_ONLY"],
                 prune_configs_by={"early_config_prune": _tiles_for_dtype})
@triton.jit(do_not_specialize=["h", "w", "H", "W", "num_pixels", "dilation", "s_ln", "s_ly", "s_hn", "s_hy",
                               "s_gn", "s_gy", "s_on", "s_oy"])
def _cascade_feature_fusion_fwd_kernel(
    low_ptr, high_ptr, w_low_ptr, w_high_ptr, bias_ptr, gather_ptr, out_ptr,
    Cl, h, w, Ch, H, W, Co, num_pixels, dilation, scale_y, scale_x, zoom_y, zoom_x,
    s_ln, s_lc, s_ly, s_lx, s_hn, s_hc, s_hy, s_hx, s_gn, s_gc, s_gy, s_gx, s_on, s_oc, s_oy, s_ox,
    ALIGN: tl.constexpr, RESIZE: tl.constexpr, HAS_TAPS: tl.constexpr, HAS_PROJ: tl.constexpr, ADD_GATHER: tl.constexpr,
    BORDER_ONLY: tl.constexpr, SKIP_BORDER: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_pixels
    if BORDER_ONLY:
        y, x = _border_pixel(offs_m, H, W)
    else:
        y = offs_m // W
        x = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
            cs = (step - tap * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ys = y + (tap // 3 - 1) * dilation
            xs = x + (tap % 3 - 1) * dilation
            inside = m_ok & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            ys = tl.minimum(tl.maximum(ys, 0), H - 1)
            xs = tl.minimum(tl.maximum(xs, 0), W - 1)
            a_mask = inside[:, None] & (cs < Cl)[None, :]
            channel = low_n + cs[None, :].to(tl.int64) * s_lc
            if RESIZE:
                y0, y1, ly = _source_index(ys, h, scale_y, ALIGN)
                x0, x1, lx = _source_index(xs, w, scale_x, ALIGN)
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
            cs = c0 + tl.arange(0, BLOCK_K)
            a = tl.load(high_n + cs[None, :].to(tl.int64) * s_hc + pixel_offset,
                        mask=m_ok[:, None] & (cs < Ch)[None, :], other=0.0)
            b = tl.load(w_high_ptr + cs[:, None] * Co + offs_n[None, :], mask=(cs < Ch)[:, None] & n_ok[None, :],
                        other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)

    tile_ok = m_ok[:, None] & n_ok[None, :]
    if ADD_GATHER:  # bilinear gather of the low-resolution conv (exact 2x zoom, align_corners)
        y0, y1, ly = _source_index(y, h, zoom_y, True)
        x0, x1, lx = _source_index(x, w, zoom_x, True)
        g = gather_ptr + n * s_gn + offs_n[None, :].to(tl.int64) * s_gc
        acc += ((1.0 - ly) * (1.0 - lx))[:, None] * tl.load(g + (y0 * s_gy + x0 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += ((1.0 - ly) * lx)[:, None] * tl.load(g + (y0 * s_gy + x1 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += (ly * (1.0 - lx))[:, None] * tl.load(g + (y1 * s_gy + x0 * s_gx)[:, None], mask=tile_ok, other=0.0)
        acc += (ly * lx)[:, None] * tl.load(g + (y1 * s_gy + x1 * s_gx)[:, None], mask=tile_ok, other=0.0)

    if EPILOGUE:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN, as torch.relu does
    if SKIP_BORDER:  # these pixels are written by the direct-conv launch
        interior = (y != 1) & (y != H - 2) & (x != 1) & (x != W - 2)
        tile_ok = tile_ok & interior[:, None]
    out = out_ptr + n * s_on + offs_n[None, :].to(tl.int64) * s_oc + (y * s_oy + x * s_ox)[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _scale(in_size, out_size, align_corners):
    """resize_scale of csrc/common/resize.h."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return in_size / out_size


def _launch(low, high, w_low, w_high, bias, gather, out, *, resize_to, dilation, align_corners,
            taps, proj, add_gather, border_only, skip_border, epilogue):
    n, co, height, width = out.shape
    cl, h, w = low.shape[1:]
    num_pixels = border_count(height, width) if border_only else height * width
    dummy = out  # stands in for absent operands; never read
    grid = lambda meta: (triton.cdiv(num_pixels, meta["BLOCK_M"]), triton.cdiv(co, meta["BLOCK_N"]), n)  # noqa: E731
    ch = high.shape[1] if high is not None else 0
    _cascade_feature_fusion_fwd_kernel[grid](
        low, high if high is not None else dummy, w_low, w_high if w_high is not None else dummy,
        bias if bias is not None else dummy, gather if gather is not None else dummy,
        out,
        cl, h, w, ch, height, width, co, num_pixels, dilation,
        _scale(h, resize_to[0], align_corners), _scale(w, resize_to[1], align_corners),
        _scale(h, height, True), _scale(w, width, True),
        *low.stride(), *(high.stride() if high is not None else (0, 0, 0, 0)),
        *(gather.stride() if gather is not None else (0, 0, 0, 0)), *out.stride(),
        ALIGN=align_corners, RESIZE=(h, w) != tuple(resize_to), HAS_TAPS=taps, HAS_PROJ=proj, ADD_GATHER=add_gather,
        BORDER_ONLY=border_only, SKIP_BORDER=skip_border, EPILOGUE=epilogue,
        PRECISION="ieee" if low.dtype == torch.float32 else "tf32",
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
        _launch(low, high, w_low, w_high, bias, None, out, resize_to=(height, width), dilation=dilation,
                align_corners=align_corners, taps=True, proj=True, add_gather=False, border_only=False,
                skip_border=False, epilogue=True)
        return out
    conv_low = torch.empty((n, co, h, w), dtype=torch.float32, device=low.device)
    _launch(low, None, w_low, None, None, None, conv_low, resize_to=(h, w), dilation=1, align_corners=True,
            taps=True, proj=False, add_gather=False, border_only=False, skip_border=False, epilogue=False)
    _launch(low, high, w_low, w_high, bias, conv_low, out, resize_to=(height, width), dilation=dilation,
            align_corners=True, taps=False, proj=True, add_gather=True, border_only=False, skip_border=True,
            epilogue=True)
    _launch(low, high, w_low, w_high, bias, None, out, resize_to=(height, width), dilation=dilation,
            align_corners=True, taps=True, proj=True, add_gather=False, border_only=True, skip_border=False,
            epilogue=True)
    return out
