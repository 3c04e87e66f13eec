#pragma once
// Geometry of summed pyramid pooling, shared by the CPU and CUDA kernels.
//
// Every bin's pooling and its bilinear resize are separable, so along each spatial axis the whole pyramid
// is two small matrices with one row per pooled position of every bin, bins stacked ("rows"):
//   pool[r, p]   weight of input position p in pooled position r (1/window length inside the window)
//   interp[r, p] weight of pooled position r in output position p (the bilinear taps)
// The forward op is out = x + sum_b interp_h^T (pool_h x pool_w^T) interp_w restricted to each bin's block;
// its adjoint is the same expression with pool and interp swapped. The kernels evaluate that expression
// with a "reduce" and an "expand" matrix per axis, so one kernel serves forward and backward.
#include <cstdint>

#include "common/hd.h"
#include "common/resize.h"

namespace icnet {

constexpr int kMaxBins = 8;

struct PyramidGeometry {
  int num_bins = 0;
  int rows = 0;                        // sum of bins: pooled positions per axis, all bins stacked
  int bins[kMaxBins] = {};
  int row_offset[kMaxBins + 1] = {};   // first stacked row of each bin
  bool adaptive = true;                // PyTorch adaptive pooling, else explicit kernel and stride
  int kernel[2][kMaxBins] = {};        // [axis][bin], explicit geometry only
  int stride[2][kMaxBins] = {};
  bool align_corners = true;
  int64_t length[2] = {};              // H, W
};

struct Window {
  int64_t begin;
  int64_t end;
};

ICNET_HD int bin_of_row(const PyramidGeometry& g, int row) {
  int b = 0;
  while (b + 1 < g.num_bins && row >= g.row_offset[b + 1]) ++b;
  return b;
}

// Input positions averaged into pooled position i of bin b along an axis.
ICNET_HD Window pool_window(const PyramidGeometry& g, int axis, int b, int64_t i) {
  if (g.adaptive) {
    const int64_t n = g.bins[b];
    const int64_t len = g.length[axis];
    return {(i * len) / n, ((i + 1) * len + n - 1) / n};
  }
  const int64_t begin = i * g.stride[axis][b];
  return {begin, begin + g.kernel[axis][b]};
}

template <typename T>
ICNET_HD T pool_weight(const PyramidGeometry& g, int axis, int row, int64_t p) {
  const int b = bin_of_row(g, row);
  const Window win = pool_window(g, axis, b, row - g.row_offset[b]);
  return (p >= win.begin && p < win.end) ? T(1) / static_cast<T>(win.end - win.begin) : T(0);
}

template <typename T>
ICNET_HD T interp_weight(const PyramidGeometry& g, int axis, int row, int64_t p) {
  const int b = bin_of_row(g, row);
  const int64_t i = row - g.row_offset[b];
  const int64_t n = g.bins[b];
  const T scale = resize_scale<T>(n, g.length[axis], g.align_corners);
  const LinearTaps<T> taps = linear_taps<T>(p, n, scale, g.align_corners);
  return (taps.i0 == i ? taps.w0 : T(0)) + (taps.i1 == i ? taps.w1 : T(0));
}

// Which matrix each stage of the kernel uses: forward reduces with pool and expands with interp,
// the adjoint (backward) reduces with interp and expands with pool.
enum class PyramidDirection { kForward, kAdjoint };

template <typename T>
ICNET_HD T reduce_weight(const PyramidGeometry& g, PyramidDirection d, int axis, int row, int64_t p) {
  return d == PyramidDirection::kForward ? pool_weight<T>(g, axis, row, p) : interp_weight<T>(g, axis, row, p);
}

template <typename T>
ICNET_HD T expand_weight(const PyramidGeometry& g, PyramidDirection d, int axis, int row, int64_t p) {
  return d == PyramidDirection::kForward ? interp_weight<T>(g, axis, row, p) : pool_weight<T>(g, axis, row, p);
}

}  // namespace icnet
