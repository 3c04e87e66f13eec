#pragma once
// Border corrections of the exact shortcut (common/cff_geometry.h), computed with ATen ops on the tensors'
// own device (the CPU kernel's form; the CUDA half-precision kernel evaluates the same formulas per border
// element, cuda/cff_shortcut_dense.cu). Per axis, the dilation-2 tap of the
// upsampled map differs from the upsampled tap of the low map only at position 1 for the first tap (by
// -low[0] / 2) and at position H-2 for the last (by -low[h-1] / 2). Expanding the 2-D conv over both
// axes gives exactly:
//   direct = up(conv3x3(low))
//          - 1/2 [y == 1]   * conv1d_x,dil2(up_x(low[:, :, 0, :]),   weight[:, :, 0, :])
//          - 1/2 [y == H-2] * conv1d_x,dil2(up_x(low[:, :, h-1, :]), weight[:, :, 2, :])
//          - 1/2 [x == 1]   * up_y(conv1d_y(low[:, :, :, 0],   weight[:, :, :, 0]))
//          - 1/2 [x == W-2] * up_y(conv1d_y(low[:, :, :, w-1], weight[:, :, :, 2]))
// (the row terms use the direct form along x, the column terms the shortcut form along y). Each term is a
// small 1-D conv over one edge of low: [N, Co, W] for rows, [N, Co, H] for columns.
#include <ATen/core/Tensor.h>

#include "common/cff_geometry.h"

namespace icnet {

struct ShortcutBorder {
  at::Tensor top, bottom, left, right;  // [N, Co, W], [N, Co, W], [N, Co, H], [N, Co, H], contiguous
};

// low [N, Cl, h, w] and weight [Co, Cl, 3, 3] in the dtype the corrections are wanted in.
ShortcutBorder shortcut_border(const at::Tensor& low, const at::Tensor& weight, const CffShape& s);

}  // namespace icnet
