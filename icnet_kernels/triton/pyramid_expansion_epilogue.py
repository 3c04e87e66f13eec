"""A 1x1 convolution of summed pyramid pooling, folded: the pyramid's bilinear expansion, bias and ReLU as
the convolution's epilogue.

The convolution W (a per-pixel channel mix) commutes with the pooling and with the per-channel bilinear
expansion, all three being linear, so

    relu(W (x + sum_b up_b(pool_b(x))) + bias) = relu(y + sum_b up_b(pool_b(y)) + bias),   y = W x.

y is the convolution without bias or ReLU (any implementation computes it); pool_b(y), a few dozen pixels
per image, is one small GEMM (pooled_grids); the kernel here reads y once and writes the result once, so the
pyramid sum over the convolution's input channels is never written.

All bins' grid cells are stacked into K entries (bin by bin, row-major within a bin). Output pixel (h, w)
weighs cell k = (b, i, j) by expand_h[b's row i, h] * expand_w[b's row j, w], the pyramid op's own
align_corners (or half-pixel) expansion matrices, so a tile of output is y plus one [pixels, K] x [K, channels]
product. Pooling and expansion matrices come from the pyramid op's stacked tables
(icnet_kernels.triton.pyramid_pool_sum), so both paths weigh every pixel alike.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from icnet_kernels.backends import triton_interpreted, triton_usable
from icnet_kernels.ops.arguments import TRITON_DTYPES, require
from icnet_kernels.triton.index_math import batch_slices, launch_grid
from icnet_kernels.triton.pyramid_pool_sum import stacked_matrices


@triton.jit(do_not_specialize=["H", "W", "num_pixels"])
def _pyramid_expansion_epilogue_kernel(
    y_ptr, grid_ptr, bias_ptr, out_ptr, expand_h_ptr, expand_w_ptr, row_h_ptr, row_w_ptr,
    C, H, W, K, num_pixels,
    s_yn, s_yc, s_yh, s_yw, s_gn, s_gc, s_gk, s_on, s_oc, s_oh, s_ow,
    RELU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < num_pixels
    h = offs_p // W
    w = offs_p % W
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    channel = offs_c.to(tl.int64)

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        row_h = tl.load(row_h_ptr + ks, mask=k_ok, other=0)
        row_w = tl.load(row_w_ptr + ks, mask=k_ok, other=0)
        e_ok = p_ok[:, None] & k_ok[None, :]
        weight = (tl.load(expand_h_ptr + row_h[None, :] * H + h[:, None], mask=e_ok, other=0.0)
                  * tl.load(expand_w_ptr + row_w[None, :] * W + w[:, None], mask=e_ok, other=0.0))
        cells = tl.load(grid_ptr + n * s_gn + ks[:, None] * s_gk + channel[None, :] * s_gc,
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.dot(weight, cells, input_precision=PRECISION)

    tile_ok = p_ok[:, None] & c_ok[None, :]
    pixel_y = (h.to(tl.int64) * s_yh + w * s_yw)[:, None]
    acc += tl.load(y_ptr + n * s_yn + channel[None, :] * s_yc + pixel_y, mask=tile_ok, other=0.0).to(tl.float32)
    acc += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, as torch.relu does
    pixel_out = (h.to(tl.int64) * s_oh + w * s_ow)[:, None]
    tl.store(out_ptr + n * s_on + channel[None, :] * s_oc + pixel_out, acc.to(out_ptr.dtype.element_ty),
             mask=tile_ok)


@dataclass(frozen=True)
class PyramidFoldTables:
    """One map size's pyramid geometry in the fold's form, float32 on one device: pool [H*W, K] (the weight
    of pixel h*W+w in each stacked grid cell), expand_h [R, H] and expand_w [R, W] (the pyramid op's stacked
    expansion rows), and row_h, row_w [K] (int32: each cell's expansion row per axis)."""

    height: int
    width: int
    pool: torch.Tensor
    expand_h: torch.Tensor
    expand_w: torch.Tensor
    row_h: torch.Tensor
    row_w: torch.Tensor

    @property
    def cells(self) -> int:
        return self.row_h.shape[0]


def pyramid_fold_tables(height: int, width: int, bins, kernel_sizes=None, strides=None, align_corners: bool = True,
                        device=None) -> PyramidFoldTables:
    """The tables of pyramid pooling with bins over a height x width map; kernel_sizes and strides as
    pyramid_pool_sum_reference takes them ((h, w) pairs, or None for adaptive pooling)."""
    kernel_sizes = None if kernel_sizes is None else tuple(tuple(p) for p in kernel_sizes)
    strides = None if strides is None else tuple(tuple(p) for p in strides)
    (pool_h, pool_w, expand_h, expand_w), _ = stacked_matrices(height, width, tuple(bins), kernel_sizes, strides,
                                                               align_corners, torch.device(device or "cpu"))
    row_h, row_w, first = [], [], 0
    for n in bins:  # bin b's rows are first .. first + n - 1 of the stacked matrices on both axes
        row_h += [first + i for i in range(n) for _ in range(n)]
        row_w += [first + j for _ in range(n) for j in range(n)]
        first += n
    row_h, row_w = (torch.tensor(rows, dtype=torch.int32, device=pool_h.device) for rows in (row_h, row_w))
    pool = torch.einsum("kh,kw->hwk", pool_h[row_h.long()], pool_w[row_w.long()]).reshape(height * width, -1)
    return PyramidFoldTables(height, width, pool.contiguous(), expand_h, expand_w, row_h, row_w)


def pooled_grids(y: torch.Tensor, tables: PyramidFoldTables) -> torch.Tensor:
    """Every bin's average pooling of y [N, C, H, W], stacked: [N, C, K] float32 (one GEMM, in float32 so
    that 16-bit maps are pooled with their exact window weights)."""
    return torch.matmul(y.flatten(2).float(), tables.pool)


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps); one small tile under the interpreter. Each tile forms its
    expansion weights and holds y's tile beside the product: 16-bit tiles take 8 warps to stay in the
    registers; float32's full-precision dot, unrolled into scalar FMAs, takes a smaller reduction block."""
    if triton_interpreted():
        return 16, 16, 16, 1
    return (64, 64, 16, 4) if dtype == torch.float32 else (64, 64, 64, 8)


def pyramid_expansion_epilogue_triton(y: torch.Tensor, grids: torch.Tensor, bias: torch.Tensor,
                                      tables: PyramidFoldTables, relu: bool = True) -> torch.Tensor:
    """relu?(y + sum_b expand_b(grids' bin b) + bias) in y's dtype and memory format, accumulated in float32.

    y [N, C, H, W] (float32, float16 or bfloat16, any strides); grids [N, C, K] the stacked pooled grids
    (float32, as pooled_grids gives them); bias [C]; tables for y's map size. ValueError naming the argument
    otherwise."""
    op = "pyramid_expansion_epilogue"
    if not triton_usable(y.device):
        raise RuntimeError(f"{op} runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
                           f"triton is imported; got a tensor on {y.device}")
    require(y.dim() == 4 and y.dtype in TRITON_DTYPES,
            f"{op}: y must be a 4-D float32, float16 or bfloat16 tensor, got {y.dim()}-D {y.dtype}")
    n, c, height, width = y.shape
    require((height, width) == (tables.height, tables.width),
            f"{op}: tables are for a {tables.height}x{tables.width} map, y's is {height}x{width}")
    require(grids.dtype == torch.float32 and tuple(grids.shape) == (n, c, tables.cells),
            f"{op}: grids must be float32 [{n}, {c}, {tables.cells}], got {grids.dtype} {list(grids.shape)}")
    require(bias.dim() == 1 and bias.shape[0] == c, f"{op}: bias must be [{c}], got {list(bias.shape)}")
    for name, t in (("grids", grids), ("bias", bias), ("tables", tables.pool)):
        require(t.device == y.device, f"{op}: {name} must be on y's device {y.device}, got {t.device}")
    out = torch.empty_like(y)
    if out.numel() == 0:
        return out
    block_p, block_c, block_k, warps = _tiles(y.dtype)
    for items in batch_slices(n):
        grid = launch_grid(op, (triton.cdiv(height * width, block_p), triton.cdiv(c, block_c), out[items].shape[0]),
                           ("pixels", "channels", "batch items"))
        _pyramid_expansion_epilogue_kernel[grid](
            y[items], grids[items], bias, out[items], tables.expand_h, tables.expand_w, tables.row_h, tables.row_w,
            c, height, width, tables.cells, height * width,
            *y.stride(), *grids.stride(), *out.stride(),
            RELU=relu, PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
            BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=warps)
    return out
