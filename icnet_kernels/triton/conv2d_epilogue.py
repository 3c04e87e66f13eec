"""Convolution with its epilogue (bias, residual sum, ReLU) in Triton: one implicit GEMM per output tile.

A program computes a [BLOCK_M output pixels x BLOCK_N output channels] tile, reducing over the window's
taps and the input channels (one loop over (tap, channel block) pairs, as the CFF kernel does). On small
maps (ICNet's 1/32 branch: a few thousand pixels, a handful of tiles) the reduction is split across
SPLIT_K programs per tile that write float32 partial sums; a second kernel adds them up and applies the
epilogue. With SPLIT_K 1 the first kernel applies it itself.
"""

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.triton.index_math import batch_slices, launch_grid
from icnet_kernels.triton.weight_layout import laid_out


@triton.jit(do_not_specialize=["H", "W", "OW", "num_pixels"])
def _conv2d_epilogue_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    Ci, H, W, Co, OW, num_pixels, steps_per_split,
    s_xn, s_xc, s_xy, s_xx, s_rn, s_rc, s_ry, s_rx, s_on, s_oc, s_oy, s_ox, s_ps, s_pn, s_pc, s_py,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr, DILATION: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2) % SPLIT_K
    n = (tl.program_id(2) // SPLIT_K).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_pixels
    oy = offs_m // OW
    ox = offs_m % OW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Co
    dot_dtype = x_ptr.dtype.element_ty
    x_n = x_ptr + n * s_xn
    k_blocks = tl.cdiv(Ci, BLOCK_K)
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, KSIZE * KSIZE * k_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, last):
        tap = step // k_blocks
        cs = (step - tap * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        iy = oy * STRIDE - PADDING + (tap // KSIZE) * DILATION
        ix = ox * STRIDE - PADDING + (tap % KSIZE) * DILATION
        inside = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a = tl.load(x_n + cs[None, :].to(tl.int64) * s_xc + (iy.to(tl.int64) * s_xy + ix * s_xx)[:, None],
                    mask=inside[:, None] & (cs < Ci)[None, :], other=0.0)
        b = tl.load(w_ptr + (tap * Ci + cs)[:, None] * Co + offs_n[None, :],
                    mask=(cs < Ci)[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a.to(dot_dtype), b, input_precision=PRECISION)

    tile_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        part = part_ptr + split * s_ps + n * s_pn + offs_n[None, :].to(tl.int64) * s_pc + offs_m[:, None] * s_py
        tl.store(part, acc, mask=tile_ok)
    else:
        _epilogue_store(acc, offs_n, n_ok, oy, ox, tile_ok, n, bias_ptr, res_ptr, out_ptr,
                        s_rn, s_rc, s_ry, s_rx, s_on, s_oc, s_oy, s_ox, HAS_RESIDUAL, RELU)


@triton.jit
def _epilogue_store(acc, offs_n, n_ok, oy, ox, tile_ok, n, bias_ptr, res_ptr, out_ptr,
                    s_rn, s_rc, s_ry, s_rx, s_on, s_oc, s_oy, s_ox, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    channel = offs_n[None, :].to(tl.int64)
    if HAS_RESIDUAL:
        res = res_ptr + n * s_rn + channel * s_rc + (oy.to(tl.int64) * s_ry + ox * s_rx)[:, None]
        acc += tl.load(res, mask=tile_ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as torch.relu does
    out = out_ptr + n * s_on + channel * s_oc + (oy.to(tl.int64) * s_oy + ox * s_ox)[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["OW", "num_pixels"])
def _conv2d_epilogue_sum_kernel(
    part_ptr, bias_ptr, res_ptr, out_ptr, Co, OW, num_pixels,
    s_ps, s_pn, s_pc, s_py, s_rn, s_rc, s_ry, s_rx, s_on, s_oc, s_oy, s_ox,
    SPLIT_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.program_id(2).to(tl.int64)
    m_ok = offs_m < num_pixels
    n_ok = offs_n < Co
    tile_ok = m_ok[:, None] & n_ok[None, :]
    part = part_ptr + n * s_pn + offs_n[None, :].to(tl.int64) * s_pc + offs_m[:, None] * s_py
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part + split * s_ps, mask=tile_ok, other=0.0)
    _epilogue_store(acc, offs_n, n_ok, offs_m // OW, offs_m % OW, tile_ok, n, bias_ptr, res_ptr, out_ptr,
                    s_rn, s_rc, s_ry, s_rx, s_on, s_oc, s_oy, s_ox, HAS_RESIDUAL, RELU)


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): tensor-core tiles for 16-bit types, small ones for float32
    (its full-precision dot unrolls into FMAs); one small tile under the interpreter."""
    if triton_interpreted():
        return 16, 16, 16, 1
    return (64, 64, 32, 4) if dtype != torch.float32 else (32, 64, 16, 4)


def _taps_by_out_channels(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, k, k] as the GEMM's [k * k * Ci, Co], tap-major."""
    co, ci, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * ci, co).contiguous()


def conv2d_epilogue_triton(x, weight, bias, residual, stride: int, padding: int, dilation: int, relu: bool,
                           split_k: int, out_size: tuple[int, int]) -> torch.Tensor:
    """relu?(conv2d(x, weight, stride, padding, dilation) + bias (+ residual)) in x's dtype and memory format;
    arguments already checked."""
    n, ci, h, w = x.shape
    co, _, k, _ = weight.shape
    oh, ow = out_size
    out = torch.empty((n, co, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if out.numel() == 0:
        return out
    w_taps = laid_out(weight, "taps_by_out_channels", _taps_by_out_channels)
    block_m, block_n, block_k, warps = _tiles(x.dtype)
    steps = k * k * triton.cdiv(ci, block_k)
    split_k = min(split_k, steps)
    per_split = triton.cdiv(steps, split_k)
    split_k = triton.cdiv(steps, per_split)  # no split left without steps
    # partial sums [split, n, co, pixels] stored channel-innermost, as the tile's accumulator is written
    part = (torch.empty((split_k, n, oh * ow, co), dtype=torch.float32, device=x.device).permute(0, 1, 3, 2)
            if split_k > 1 else out.new_empty(0))
    part_strides = part.stride() if split_k > 1 else (0, 0, 0, 0)
    has_residual = residual is not None
    res_strides = residual.stride() if has_residual else (0, 0, 0, 0)
    residual = residual if has_residual else out  # stands in for an absent residual; never read
    axes = ("output pixels", "output channels", "batch items")
    for items in batch_slices(n, split_k):
        x_i, residual_i, out_i, part_i = x[items], residual[items], out[items], part[:, items] if split_k > 1 else part
        batch = out_i.shape[0]
        grid = launch_grid("conv2d_epilogue",
                           (triton.cdiv(oh * ow, block_m), triton.cdiv(co, block_n), batch * split_k), axes)
        _conv2d_epilogue_fwd_kernel[grid](
            x_i, w_taps, bias, residual_i, out_i, part_i, ci, h, w, co, ow, oh * ow, per_split,
            *x.stride(), *res_strides, *out.stride(), *part_strides,
            KSIZE=k, STRIDE=stride, PADDING=padding, DILATION=dilation, SPLIT_K=split_k,
            HAS_RESIDUAL=has_residual, RELU=relu, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        if split_k > 1:
            _conv2d_epilogue_sum_kernel[(grid[0], grid[1], batch)](
                part_i, bias, residual_i, out_i, co, ow, oh * ow, *part_strides, *res_strides, *out.stride(),
                SPLIT_K=split_k, HAS_RESIDUAL=has_residual, RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps)
    return out
