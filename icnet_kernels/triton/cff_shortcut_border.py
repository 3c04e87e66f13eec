"""The exact CFF shortcut's border corrections in Triton: four small GEMMs over the edges of low, one launch.

Where up is the exact 2x zoom with align_corners and the dilation is 2, conv3x3_dil2(up(low)) equals
up(conv3x3(low)) except on rows 1 and H-2 and columns 1 and W-2, where the two sides' zero padding differs.
Per axis, the dilated tap of the upsampled map and the upsampled tap of low differ only at position 1 for
the first tap (by -low[0] / 2) and at position H-2 for the last (by -low[h-1] / 2), so over both axes
(csrc/cpu/cff_border.h derives the same terms)

    direct = up(conv3x3(low)) + [y == 1] top[x] + [y == H-2] bottom[x] + [x == 1] left[y] + [x == W-2] right[y]

    top    = -1/2 conv1d_x,dil2(up_x(low[:, :, 0, :]),   weight[:, :, 0, :])
    bottom = -1/2 conv1d_x,dil2(up_x(low[:, :, h-1, :]), weight[:, :, 2, :])
    left   = -1/2 up_y(conv1d_y(low[:, :, :, 0],   weight[:, :, :, 0]))
    right  = -1/2 up_y(conv1d_y(low[:, :, :, w-1], weight[:, :, :, 2]))

(the row terms in the direct form along x, the column terms in the shortcut form along y), all four at full
resolution. Each edge is a [positions, 3 * Cl] x [3 * Cl, Co] GEMM whose A tile is read from low and
interpolated on the fly (a channel mix commutes with a resize along the edge); the fusion pass adds the terms
to the border pixels in its epilogue with one load per axis (icnet_kernels.triton.cascade_feature_fusion).
Where H = 3 (or W = 3) row 1 is row H-2 (column 1 is column W-2): both terms apply there, and the first
entry holds their sum.
"""

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted
from icnet_kernels.triton.index_math import (batch_slices, in_image_index, launch_grid, needs_wide_index, resize_scale,
                                            source_index)

EDGES = tl.constexpr(4)  # top, bottom, left, right, in the corrections tensor's order


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _shortcut_border_kernel(
    low_ptr, w_ptr, corr_ptr,
    Cl, h, w, H, W, Co, zoom_y, zoom_x,
    s_ln, s_lc, s_ly, s_lx, s_cn, s_cc, s_ce,
    WIDE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    edge = tl.program_id(2) % EDGES
    n = (tl.program_id(2) // EDGES).to(tl.int64)
    on_row = edge < 2
    far = edge % 2 == 1  # bottom or right: low's last row or column, the kernel's last tap row or column
    length = tl.where(on_row, W, H)
    first = tl.where(on_row, edge * W, 2 * W + (edge - 2) * H)  # the edge's first entry in the corrections
    offs_m = in_image_index(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), WIDE)
    m_ok = offs_m < length
    offs_n = in_image_index(tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)
    n_ok = offs_n < Co
    dot_dtype = low_ptr.dtype.element_ty
    low_n = low_ptr + n * s_ln
    k_blocks = tl.cdiv(Cl, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.program_id(0) * BLOCK_M < length:  # programs past a short edge's end have nothing to do
        # the column terms are upsampled along y after their taps: each output row's two low-resolution rows
        y0, y1, ly = source_index(tl.minimum(offs_m, H - 1), h, zoom_y, True)
        for step in range(0, 3 * k_blocks):
            tap = step // k_blocks
            cs = in_image_index((step - tap * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K), WIDE)
            c_ok = cs < Cl
            channel = cs[None, :] * s_lc
            if on_row:  # row 0 or h-1 of low, upsampled along x, at the dilated tap x + 2 (tap - 1)
                at = offs_m + 2 * (tap - 1)
                a_mask = (m_ok & (at >= 0) & (at < W))[:, None] & c_ok[None, :]
                x0, x1, lx = source_index(tl.minimum(tl.maximum(at, 0), W - 1), w, zoom_x, True)
                row = low_n + channel + tl.where(far, h - 1, 0).to(tl.int64) * s_ly
                a = ((1.0 - lx)[:, None] * tl.load(row + (x0 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32)
                     + lx[:, None] * tl.load(row + (x1 * s_lx)[:, None], mask=a_mask, other=0.0).to(tl.float32))
                kernel_tap = tl.where(far, 6, 0) + tap  # kernel row 0 or 2, column `tap`
            else:  # column 0 or w-1 of low, tap `tap` at low-resolution rows y0 + tap - 1 and y1 + tap - 1
                column = low_n + channel + tl.where(far, w - 1, 0).to(tl.int64) * s_lx
                at0 = y0 + tap - 1
                at1 = y1 + tap - 1
                ok0 = (m_ok & (at0 >= 0) & (at0 < h))[:, None] & c_ok[None, :]
                ok1 = (m_ok & (at1 >= 0) & (at1 < h))[:, None] & c_ok[None, :]
                a = ((1.0 - ly)[:, None] * tl.load(column + (tl.minimum(tl.maximum(at0, 0), h - 1) * s_ly)[:, None],
                                                   mask=ok0, other=0.0).to(tl.float32)
                     + ly[:, None] * tl.load(column + (tl.minimum(tl.maximum(at1, 0), h - 1) * s_ly)[:, None],
                                             mask=ok1, other=0.0).to(tl.float32))
                kernel_tap = tap * 3 + tl.where(far, 2, 0)  # kernel row `tap`, column 0 or 2
            b = tl.load(w_ptr + (kernel_tap * Cl + cs)[:, None] * Co + offs_n[None, :],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a.to(dot_dtype), b, input_precision=PRECISION)
    out = corr_ptr + n * s_cn + offs_n[None, :] * s_cc + ((first + offs_m) * s_ce)[:, None]
    tl.store(out, -0.5 * acc, mask=m_ok[:, None] & n_ok[None, :])


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps); one small tile under the interpreter. float32's dot runs at
    full precision, unrolled into scalar FMAs, so it gets the smaller reduction block."""
    if triton_interpreted():
        return 16, 16, 16, 1
    return (32, 64, 16, 4) if dtype == torch.float32 else (32, 64, 32, 4)


def border_entries(height: int, width: int) -> int:
    """How many positions the corrections hold per image and channel: 2 W along the rows, 2 H along the columns."""
    return 2 * width + 2 * height


def shortcut_border_corrections(low: torch.Tensor, weight_taps: torch.Tensor, height: int, width: int,
                                channels_last: bool) -> torch.Tensor:
    """The four edge terms, float32 [N, Co, 2 W + 2 H] (top and bottom at each x, left and right at each y,
    all at full resolution), stored with Co innermost when channels_last (the fusion pass's output layout).
    Where H = 3 the top entries hold top + bottom, where W = 3 the left entries left + right.

    low [N, Cl, h, w] (h, w >= 2, H = 2h-1, W = 2w-1); weight_taps [9 * Cl, Co], tap-major, as the fusion
    kernel reads weight_low."""
    n, cl, h, w = low.shape
    co = weight_taps.shape[1]
    entries = border_entries(height, width)
    if channels_last:
        corr = torch.empty((n, entries, co), dtype=torch.float32, device=low.device).permute(0, 2, 1)
    else:
        corr = torch.empty((n, co, entries), dtype=torch.float32, device=low.device)
    if corr.numel() == 0:
        return corr
    block_m, block_n, block_k, warps = _tiles(low.dtype)
    wide = needs_wide_index((low, corr), (weight_taps,))
    for items in batch_slices(n, EDGES.value):
        grid = launch_grid("cascade_feature_fusion", (triton.cdiv(max(width, height), block_m),
                                                      triton.cdiv(co, block_n), corr[items].shape[0] * EDGES.value),
                           ("border pixels", "output channels", "batch items"))
        _shortcut_border_kernel[grid](
            low[items], weight_taps, corr[items], cl, h, w, height, width, co, resize_scale(h, height, True),
            resize_scale(w, width, True), *low.stride(), *corr.stride(),
            WIDE=wide, PRECISION="ieee" if low.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    # a 3-pixel side's one border row (column) is both edges': the pass reads one entry per axis
    if height == 3:
        corr[:, :, :width] += corr[:, :, width:2 * width]
    if width == 3:
        corr[:, :, 2 * width:2 * width + height] += corr[:, :, 2 * width + height:]
    return corr
