"""Summed pyramid pooling in Triton.

With all bins' 1-D matrices stacked into R rows per axis, one plane's output is
    out = x + expand_h^T . (mask * (reduce_h . x . reduce_w^T)) . expand_w
where mask keeps each bin's own block. Forward reduces with the pooling matrices and expands with the
bilinear ones; the backward is the same kernel with the two swapped. A program owns one plane: a first
sweep over tiles accumulates the R x R pooled grid, a second sweep writes x plus the expansion.
"""

import functools

import torch
import triton
import triton.language as tl

from icnet_kernels.reference import pyramid_bin_matrices
from icnet_kernels.triton.index_math import batch_slices, launch_grid


@triton.jit
def _pyramid_pool_sum_kernel(
    x_ptr, out_ptr, reduce_h_ptr, reduce_w_ptr, expand_h_ptr, expand_w_ptr, bin_ptr,
    C, H, W, R,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    out_base = out_ptr + n.to(tl.int64) * son + c.to(tl.int64) * soc
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R

    pooled = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        reduce_h = tl.load(reduce_h_ptr + r[:, None] * H + hs[None, :], mask=r_ok[:, None] & h_ok[None, :], other=0.0)
        reduced_w = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
        for w0 in range(0, W, BLOCK_W):
            ws = w0 + tl.arange(0, BLOCK_W)
            w_ok = ws < W
            tile = tl.load(x_base + hs[:, None] * sxh + ws[None, :] * sxw,
                           mask=h_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
            reduce_w_t = tl.load(reduce_w_ptr + r[None, :] * W + ws[:, None],
                                 mask=r_ok[None, :] & w_ok[:, None], other=0.0)
            reduced_w += tl.dot(tile, reduce_w_t, input_precision=PRECISION)
        pooled += tl.dot(reduce_h, reduced_w, input_precision=PRECISION)

    bin_of_row = tl.load(bin_ptr + r, mask=r_ok, other=-1)
    pooled = tl.where(bin_of_row[:, None] == bin_of_row[None, :], pooled, 0.0)

    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        expand_h_t = tl.load(expand_h_ptr + r[None, :] * H + hs[:, None], mask=r_ok[None, :] & h_ok[:, None], other=0.0)
        expanded_h = tl.dot(expand_h_t, pooled, input_precision=PRECISION)
        for w0 in range(0, W, BLOCK_W):
            ws = w0 + tl.arange(0, BLOCK_W)
            w_ok = ws < W
            mask = h_ok[:, None] & w_ok[None, :]
            tile = tl.load(x_base + hs[:, None] * sxh + ws[None, :] * sxw, mask=mask, other=0.0).to(tl.float32)
            expand_w = tl.load(expand_w_ptr + r[:, None] * W + ws[None, :], mask=r_ok[:, None] & w_ok[None, :], other=0.0)
            result = tile + tl.dot(expanded_h, expand_w, input_precision=PRECISION)
            tl.store(out_base + hs[:, None] * soh + ws[None, :] * sow, result.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=64)
def stacked_matrices(height, width, bins, kernel_sizes, strides, align_corners, device):
    """Stacked (pool_h, pool_w, interp_h, interp_w) [R, L] float32 and the bin index of each row."""
    per_bin = pyramid_bin_matrices(height, width, bins, kernel_sizes, strides, align_corners, torch.float32, device)
    stacked = tuple(torch.cat([m[k] for m in per_bin]).contiguous() for k in range(4))
    bin_of_row = torch.cat([torch.full((n,), b, dtype=torch.int32, device=device) for b, n in enumerate(bins)])
    return stacked, bin_of_row


def pyramid_pool_sum_triton(x: torch.Tensor, bins, kernel_sizes, strides, align_corners: bool,
                            adjoint: bool = False) -> torch.Tensor:
    """Forward (adjoint=False) or backward (adjoint=True, x is grad_out) of summed pyramid pooling."""
    n, c, height, width = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    (pool_h, pool_w, interp_h, interp_w), bin_of_row = stacked_matrices(
        height, width, tuple(bins), kernel_sizes, strides, align_corners, x.device)
    reduce_h, reduce_w, expand_h, expand_w = (
        (interp_h, interp_w, pool_h, pool_w) if adjoint else (pool_h, pool_w, interp_h, interp_w))
    rows = pool_h.shape[0]
    # tl.dot needs every block dimension >= 16.
    block_r = max(16, triton.next_power_of_2(rows))
    block_w = max(16, min(128, triton.next_power_of_2(width)))
    block_h = max(16, min(4096 // block_w, triton.next_power_of_2(height)))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    for items in batch_slices(n, c, along="x"):  # one program per channel plane
        grid = launch_grid("pyramid_pool_sum", (out[items].shape[0] * c, 1, 1), ("channel planes", "", ""))
        _pyramid_pool_sum_kernel[grid](
            x[items], out[items], reduce_h, reduce_w, expand_h, expand_w, bin_of_row,
            c, height, width, rows,
            *x.stride(), *out.stride(),
            BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_R=block_r, PRECISION=precision,
        )
    return out
