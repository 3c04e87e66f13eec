#pragma once
// Geometry of cascade feature fusion, shared by the CPU and CUDA kernels.
//
//   out = relu(conv3x3_dil(up(low), weight_low) + weight_high . high + bias),  up = bilinear resize to HxW
//
// Reduction index k runs over the dilated 3x3 taps of up(low), tap-major (k = tap * Cl + c, tap = ky*3+kx,
// so weight_low is laid out [Co, 3, 3, Cl]), then over high's channels.
//
// Exact shortcut: when up is the exact 2x zoom with align_corners (H = 2h-1, W = 2w-1) and the dilation is
// 2, conv3x3_dil2(up(low)) == up(conv3x3(low)) except at rows 1 and H-2 and columns 1 and W-2, where the
// zero padding of the two sides differs. The kernels then convolve at low resolution, gather that result
// bilinearly, and compute the border rows and columns directly.
#include <cstdint>

#include "common/hd.h"

namespace icnet {

struct CffShape {
  int64_t N, Cl, h, w;  // low
  int64_t Ch, H, W;     // high
  int64_t Co;           // output channels
  int64_t dilation;
  bool align_corners;
};

ICNET_HD bool cff_exact_shortcut(const CffShape& s) {
  return s.align_corners && s.dilation == 2 && s.H == 2 * s.h - 1 && s.W == 2 * s.w - 1 && s.H >= 3 && s.W >= 3;
}

// Tap-first evaluation, exact for any geometry: the channel mixing of each tap commutes with the resize and
// the shift, so conv3x3_dil(up(low)) = sum over taps t of shift_t(up(W_t . low)). The nine 1x1 mixes run at
// low resolution, then each output pixel sums nine bilinear gathers. Worth it when low has at most half of
// high's pixels: the dense work shrinks by H*W / (h*w), the gathers cost 36 reads per output element.
ICNET_HD bool cff_tap_first(const CffShape& s) { return 2 * s.h * s.w <= s.H * s.W; }

// Output pixels that the shortcut cannot produce and that are computed directly.
ICNET_HD bool cff_shortcut_border(int64_t y, int64_t x, int64_t H, int64_t W) {
  return y == 1 || y == H - 2 || x == 1 || x == W - 2;
}

// The shortcut's border pixels, enumerated without a list: the whole rows 1 and H-2 first, then columns 1
// and W-2 of every other row (H, W >= 3).
ICNET_HD int64_t cff_border_count(int64_t H, int64_t W) {
  const int64_t rows = H - 2 != 1 ? 2 : 1, cols = W - 2 != 1 ? 2 : 1;
  return rows * W + (H - rows) * cols;
}

ICNET_HD void cff_border_pixel(int64_t p, int64_t H, int64_t W, int64_t& y, int64_t& x) {
  const int64_t rows = H - 2 != 1 ? 2 : 1, cols = W - 2 != 1 ? 2 : 1;
  if (p < rows * W) {
    y = p / W == 0 ? 1 : H - 2;
    x = p % W;
    return;
  }
  const int64_t q = p - rows * W;
  y = q / cols;  // the y-th row that is not a border row: skip row 1, then row H-2
  if (y >= 1) ++y;
  if (rows == 2 && y >= H - 2) ++y;
  x = q % cols == 0 ? 1 : W - 2;
}

// The source offset of 3x3 tap index t (0..2) along an axis at dilation d.
ICNET_HD int64_t cff_tap_offset(int t, int64_t d) { return (t - 1) * d; }

}  // namespace icnet
