#pragma once
// Bilinear resize coordinates, in PyTorch's arithmetic (upsample_bilinear2d with an output size and no
// scale factor), so every kernel agrees with F.interpolate to rounding.
#include <cstdint>

#include "common/hd.h"

namespace icnet {

template <typename T>
struct LinearTaps {
  int64_t i0;  // lower source index
  int64_t i1;  // upper source index (== i0 at the last source position)
  T w0;        // weight of i0
  T w1;        // weight of i1
};

// Source-per-destination step: (in-1)/(out-1) with align_corners, in/out without.
template <typename T>
ICNET_HD T resize_scale(int64_t in_size, int64_t out_size, bool align_corners) {
  if (align_corners) {
    return out_size > 1 ? static_cast<T>(in_size - 1) / static_cast<T>(out_size - 1) : T(0);
  }
  return static_cast<T>(in_size) / static_cast<T>(out_size);
}

template <typename T>
ICNET_HD LinearTaps<T> linear_taps(int64_t dst, int64_t in_size, T scale, bool align_corners) {
  T src = align_corners ? scale * static_cast<T>(dst)
                        : scale * (static_cast<T>(dst) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  T lambda = src - static_cast<T>(i0);
  if (lambda < T(0)) lambda = T(0);
  if (lambda > T(1)) lambda = T(1);
  const int64_t i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  return {i0, i1, T(1) - lambda, lambda};
}

// The taps of output position dst of a resize from in_size to out_size. Equal sizes give the position
// itself alone, as ATen copies in that case: no zero-weighted neighbour whose NaN could leak.
template <typename T>
ICNET_HD LinearTaps<T> resize_taps(int64_t dst, int64_t in_size, int64_t out_size, bool align_corners) {
  if (in_size == out_size) return {dst, dst, T(1), T(0)};
  return linear_taps<T>(dst, in_size, resize_scale<T>(in_size, out_size, align_corners), align_corners);
}

}  // namespace icnet
