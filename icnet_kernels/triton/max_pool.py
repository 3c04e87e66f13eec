"""Max pooling in Triton: the pooled values only, without the int64 indices that ATen's CUDA max pooling
writes beside them for a backward pass that inference never runs.

A program owns a tile of [BLOCK_P output pixels x BLOCK_C channels] of one image and takes the maximum
over the window's KERNEL x KERNEL taps (unrolled); taps in the padding are skipped, and a NaN wins, as in
ATen.
"""

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted
from icnet_kernels.cff_geometry import memory_format_of
from icnet_kernels.ops.max_pool import pooled_size
from icnet_kernels.triton.index_math import batch_slices, launch_grid


@triton.jit(do_not_specialize=["H", "W", "OW", "num_pixels"])
def _max_pool_fwd_kernel(
    x_ptr, out_ptr, C, H, W, OW, num_pixels,
    s_xn, s_xc, s_xy, s_xx, s_on, s_oc, s_oy, s_ox,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, PADDING: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < num_pixels
    oy = offs_p // OW
    ox = offs_p % OW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    channel = x_ptr + n * s_xn + offs_c[None, :].to(tl.int64) * s_xc
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for ky in tl.static_range(KERNEL):
        iy = oy * STRIDE - PADDING + ky
        for kx in tl.static_range(KERNEL):
            ix = ox * STRIDE - PADDING + kx
            inside = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            v = tl.load(channel + (iy.to(tl.int64) * s_xy + ix.to(tl.int64) * s_xx)[:, None],
                        mask=inside[:, None] & c_ok[None, :], other=float("-inf")).to(tl.float32)
            best = tl.where((v > best) | (v != v), v, best)
    out = (out_ptr + n * s_on + offs_c[None, :].to(tl.int64) * s_oc
           + (oy.to(tl.int64) * s_oy + ox.to(tl.int64) * s_ox)[:, None])
    tl.store(out, best.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def _tiles(channels: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps); under the interpreter larger tiles mean fewer interpreted programs."""
    if triton_interpreted():
        return 128, min(64, triton.next_power_of_2(channels)), 1
    return 64, min(32, triton.next_power_of_2(channels)), 4


def max_pool_triton(x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """max_pool2d(x, kernel_size, stride, padding) in x's dtype and memory format; arguments already checked."""
    n, c, h, w = x.shape
    oh, ow = pooled_size(h, w, kernel_size, stride, padding)
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if out.numel() == 0:
        return out
    block_p, block_c, num_warps = _tiles(c)
    for items in batch_slices(n):
        grid = launch_grid("max_pool", (triton.cdiv(oh * ow, block_p), triton.cdiv(c, block_c), out[items].shape[0]),
                           ("output pixels", "channels", "batch items"))
        _max_pool_fwd_kernel[grid](x[items], out[items], c, h, w, ow, oh * ow, *x.stride(), *out.stride(),
                                   KERNEL=kernel_size, STRIDE=stride, PADDING=padding,
                                   BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps)
    return out
