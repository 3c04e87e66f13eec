#include "common/pyramid_args.h"

#include <limits>

namespace icnet {

PyramidGeometry make_pyramid_geometry(const at::Tensor& x, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                                      c10::IntArrayRef strides, bool align_corners, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D tensor [N, C, H, W], got ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  const int64_t H = x.size(2);
  const int64_t W = x.size(3);
  TORCH_CHECK_VALUE(H > 0 && W > 0, op, ": x must have a non-empty spatial size, got ", H, "x", W);
  TORCH_CHECK_VALUE(!bins.empty(), op, ": bins must name at least one bin");
  TORCH_CHECK_VALUE(static_cast<int64_t>(bins.size()) <= kMaxBins, op, ": bins may have at most ", kMaxBins,
              " entries, got ", bins.size());
  TORCH_CHECK_VALUE(H * W <= std::numeric_limits<int32_t>::max(), op, ": x's spatial size ", H, "x", W,
              " is too large");

  PyramidGeometry g;
  g.num_bins = static_cast<int>(bins.size());
  g.align_corners = align_corners;
  g.length[0] = H;
  g.length[1] = W;
  g.adaptive = kernel_sizes.empty();
  TORCH_CHECK_VALUE(g.adaptive == strides.empty(), op,
              ": kernel_sizes and strides must both be given (explicit pooling) or both be empty (adaptive)");
  if (!g.adaptive) {
    TORCH_CHECK_VALUE(kernel_sizes.size() == 2 * bins.size(), op, ": kernel_sizes must hold one (kh, kw) pair per bin (",
                2 * bins.size(), " numbers), got ", kernel_sizes.size());
    TORCH_CHECK_VALUE(strides.size() == 2 * bins.size(), op, ": strides must hold one (sh, sw) pair per bin (",
                2 * bins.size(), " numbers), got ", strides.size());
  }
  for (int b = 0; b < g.num_bins; ++b) {
    const int64_t n = bins[b];
    TORCH_CHECK_VALUE(n >= 1, op, ": bins[", b, "] must be at least 1, got ", n);
    TORCH_CHECK_VALUE(n <= H && n <= W, op, ": bins[", b, "] = ", n, " is larger than the ", H, "x", W, " map");
    g.bins[b] = static_cast<int>(n);
    g.row_offset[b + 1] = g.row_offset[b] + g.bins[b];
    if (g.adaptive) continue;
    for (int axis = 0; axis < 2; ++axis) {
      const int64_t k = kernel_sizes[2 * b + axis];
      const int64_t s = strides[2 * b + axis];
      const int64_t len = g.length[axis];
      TORCH_CHECK_VALUE(k >= 1 && k <= len, op, ": kernel_sizes[", 2 * b + axis, "] = ", k, " must be in [1, ", len, "]");
      TORCH_CHECK_VALUE(s >= 1, op, ": strides[", 2 * b + axis, "] = ", s, " must be at least 1");
      TORCH_CHECK_VALUE((len - k) / s + 1 == n, op, ": bin ", n, " with kernel ", k, " and stride ", s, " gives ",
                  (len - k) / s + 1, " pooled positions along a side of ", len, "; they must agree");
      g.kernel[axis][b] = static_cast<int>(k);
      g.stride[axis][b] = static_cast<int>(s);
    }
  }
  g.rows = g.row_offset[g.num_bins];
  return g;
}

}  // namespace icnet
