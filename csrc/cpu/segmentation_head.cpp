// Segmentation head on the CPU: the 1x1 classifier as one GEMM per image on the low-resolution map, then
// the exact integer zoom (align_corners) written once.
//
// With zoom z the output column X = j*z + a lies between input columns j and j+1 with weight a/z, and the
// output row Y = i*z + b between rows i and i+1 with weight b/z. The classifier commutes with the zoom
// (both are linear and the interpolation weights sum to one), so the GEMM runs on a 1/z^2 share of the
// pixels and the zoom interpolates num_classes channels instead of K. A task owns one input row i of one
// image (and, for logits in NCHW, one class): it widens rows i and i+1 into cache-resident buffers and
// writes the z output rows as lerps of the two. Where the right (lower) sample's weight is 0 the output is
// the left (upper) sample itself, so a non-finite logit reaches exactly the outputs that interpolate it.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/layout.h"
#include "common/segmentation_head_args.h"
#include "cpu/narrow.h"

namespace icnet {
namespace {

// bias + weight . features at every low-resolution pixel, in acc_t: [N, C, h*w] (classes_first) or
// [N, h*w, C], contiguous; one GEMM per image, written in place.
at::Tensor low_resolution_logits(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                                 at::ScalarType acc, bool classes_first) {
  const int64_t n = features.size(0), k = features.size(1), c = weight.size(0);
  const int64_t pixels = features.size(2) * features.size(3);
  const at::Tensor w = weight.to(acc), b = bias.to(acc);
  if (classes_first) {
    const at::Tensor f = features.to(acc).reshape({n, k, pixels});
    at::Tensor low = at::empty({n, c, pixels}, f.options());
    const at::Tensor b_col = b.view({c, 1}).expand({c, pixels});
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor image = low[i];
      at::addmm_out(image, b_col, w, f[i]);
    }
    return low;
  }
  const at::Tensor f = features.to(acc).permute({0, 2, 3, 1}).reshape({n, pixels, k});
  at::Tensor low = at::empty({n, pixels, c}, f.options());
  const at::Tensor b_row = b.view({1, c}).expand({pixels, c});
  const at::Tensor w_t = w.t();
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor image = low[i];
    at::addmm_out(image, b_row, f[i], w_t);
  }
  return low;
}

// The fractions a/zoom of one zoom step, as the lerps use them.
template <typename acc_t>
std::vector<acc_t> zoom_fractions(int64_t zoom) {
  std::vector<acc_t> t(zoom);
  for (int64_t a = 0; a < zoom; ++a) t[a] = static_cast<acc_t>(a) / static_cast<acc_t>(zoom);
  return t;
}

// One class plane's row widened with a compile-time zoom, so each input pixel's Z outputs are one vector
// operation. The a = 0 output is the left sample itself (its right weight is 0 and a non-finite right sample
// must not reach it), set after the vector loop.
template <int64_t Z, typename acc_t>
void widen_plane_row(const acc_t* src, acc_t* dst, int64_t w, const acc_t* t) {
  acc_t right_weight[Z], left_weight[Z];
  for (int64_t a = 0; a < Z; ++a) {
    right_weight[a] = t[a];
    left_weight[a] = 1 - t[a];
  }
  for (int64_t j = 0; j + 1 < w; ++j) {
    const acc_t left = src[j], right = src[j + 1];
    acc_t* out = dst + j * Z;
#pragma omp simd
    for (int64_t a = 0; a < Z; ++a) out[a] = left_weight[a] * left + right_weight[a] * right;
    out[0] = left;
  }
  dst[(w - 1) * Z] = src[w - 1];
}

// dst[(j*zoom + a)*group + g] = lerp(src[j*group + g], src[(j+1)*group + g], t[a]) over the zoomed width:
// one low-resolution row widened, group values per pixel (1 for a class plane, C for a channels-last row).
template <typename acc_t>
void widen_row(const acc_t* src, acc_t* dst, int64_t w, int64_t zoom, int64_t group, const std::vector<acc_t>& t) {
  if (group == 1) {
    switch (zoom) {
      case 2: return widen_plane_row<2>(src, dst, w, t.data());
      case 4: return widen_plane_row<4>(src, dst, w, t.data());
      case 8: return widen_plane_row<8>(src, dst, w, t.data());
      case 16: return widen_plane_row<16>(src, dst, w, t.data());
      case 32: return widen_plane_row<32>(src, dst, w, t.data());
      default: break;
    }
  }
  for (int64_t j = 0; j + 1 < w; ++j) {
    const acc_t* left = src + j * group;
    const acc_t* right = left + group;
    acc_t* out = dst + j * zoom * group;
    for (int64_t g = 0; g < group; ++g) out[g] = left[g];
    for (int64_t a = 1; a < zoom; ++a) {
      const acc_t ta = t[a], sa = 1 - ta;
      acc_t* o = out + a * group;
#pragma omp simd
      for (int64_t g = 0; g < group; ++g) o[g] = sa * left[g] + ta * right[g];
    }
  }
  const acc_t* last = src + (w - 1) * group;
  acc_t* out = dst + (w - 1) * zoom * group;
  for (int64_t g = 0; g < group; ++g) out[g] = last[g];
}

// out[x] = lerp(top[x], bottom[x], s) for x < count; s == 0 reads top alone.
template <typename acc_t>
void blend_rows(const acc_t* top, const acc_t* bottom, acc_t s, acc_t* out, int64_t count) {
  if (s == 0) {
    std::copy(top, top + count, out);
    return;
  }
  const acc_t r = 1 - s;
#pragma omp simd
  for (int64_t x = 0; x < count; ++x) out[x] = r * top[x] + s * bottom[x];
}

// The same into the output's dtype: blended in acc_t (into scratch, count long, where the dtypes differ;
// unused where they are the same), then stored.
template <typename scalar_t, typename acc_t>
void blend_rows_into(const acc_t* top, const acc_t* bottom, acc_t s, scalar_t* out, int64_t count, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    blend_rows(top, bottom, s, out, count);
  } else {
    blend_rows(top, bottom, s, scratch, count);
    store_row(scratch, out, count);
  }
}

// The output rows input row i zooms into: zoom of them, one for the last row.
inline int64_t rows_of(int64_t i, int64_t h, int64_t zoom) { return i + 1 < h ? zoom : 1; }

// Logits in NCHW: a task is one (image, class, input row).
template <typename scalar_t, typename acc_t>
void zoom_planes(const acc_t* low, scalar_t* out, int64_t planes, int64_t h, int64_t w, int64_t zoom) {
  const int64_t H = (h - 1) * zoom + 1, W = (w - 1) * zoom + 1;
  const std::vector<acc_t> t = zoom_fractions<acc_t>(zoom);
  at::parallel_for(0, planes * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top(W), bottom(W), scratch(std::is_same_v<scalar_t, acc_t> ? 0 : W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / h, i = task % h;
      const acc_t* row = low + (plane * h + i) * w;
      widen_row(row, top.data(), w, zoom, 1, t);
      if (i + 1 < h) widen_row(row + w, bottom.data(), w, zoom, 1, t);
      scalar_t* dst = out + (plane * H + i * zoom) * W;
      for (int64_t b = 0; b < rows_of(i, h, zoom); ++b) {
        blend_rows_into(top.data(), bottom.data(), t[b], dst + b * W, W, scratch.data());
      }
    }
  });
}

// Logits channels-last: a task is one (image, input row); an output row is W*C contiguous values.
template <typename scalar_t, typename acc_t>
void zoom_rows_channels_last(const acc_t* low, scalar_t* out, int64_t n, int64_t c, int64_t h, int64_t w,
                             int64_t zoom) {
  const int64_t H = (h - 1) * zoom + 1, W = (w - 1) * zoom + 1;
  const std::vector<acc_t> t = zoom_fractions<acc_t>(zoom);
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top(W * c), bottom(W * c), scratch(std::is_same_v<scalar_t, acc_t> ? 0 : W * c);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / h, i = task % h;
      const acc_t* row = low + (image * h + i) * w * c;
      widen_row(row, top.data(), w, zoom, c, t);
      if (i + 1 < h) widen_row(row + w * c, bottom.data(), w, zoom, c, t);
      scalar_t* dst = out + (image * H + i * zoom) * W * c;
      for (int64_t b = 0; b < rows_of(i, h, zoom); ++b) {
        blend_rows_into(top.data(), bottom.data(), t[b], dst + b * W * c, W * c, scratch.data());
      }
    }
  });
}

// The running argmax over classes after class k's blended row: torch.argmax's rule, the first NaN, else the
// first maximum. Labels are int32 here so that the loop vectorises at the width of the values.
template <bool kTopOnly, typename acc_t>
void argmax_step(const acc_t* top, const acc_t* bottom, acc_t s, int32_t k, acc_t* best, int32_t* label, int64_t W) {
  const acc_t r = 1 - s;
#pragma omp simd
  for (int64_t x = 0; x < W; ++x) {
    const acc_t v = kTopOnly ? top[x] : r * top[x] + s * bottom[x];
    const acc_t m = best[x];
    const bool take = v > m || (v != v && m == m);
    best[x] = take ? v : m;
    label[x] = take ? k : label[x];
  }
}

// Labels: a task is one (image, input row); every class's two widened rows stay in cache while each zoom
// row's classes are blended into a running argmax.
template <typename acc_t>
void zoom_labels(const acc_t* low, uint8_t* out, int64_t n, int64_t c, int64_t h, int64_t w, int64_t zoom) {
  const int64_t H = (h - 1) * zoom + 1, W = (w - 1) * zoom + 1;
  const std::vector<acc_t> t = zoom_fractions<acc_t>(zoom);
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> top(c * W), bottom(c * W), best(W);
    std::vector<int32_t> label(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / h, i = task % h;
      for (int64_t k = 0; k < c; ++k) {
        const acc_t* row = low + ((image * c + k) * h + i) * w;
        widen_row(row, top.data() + k * W, w, zoom, 1, t);
        if (i + 1 < h) widen_row(row + w, bottom.data() + k * W, w, zoom, 1, t);
      }
      for (int64_t b = 0; b < rows_of(i, h, zoom); ++b) {
        blend_rows(top.data(), bottom.data(), t[b], best.data(), W);
        std::fill(label.begin(), label.end(), 0);
        for (int64_t k = 1; k < c; ++k) {
          const acc_t* tk = top.data() + k * W;
          const acc_t* bk = bottom.data() + k * W;
          if (b == 0) {
            argmax_step<true>(tk, bk, t[b], static_cast<int32_t>(k), best.data(), label.data(), W);
          } else {
            argmax_step<false>(tk, bk, t[b], static_cast<int32_t>(k), best.data(), label.data(), W);
          }
        }
        uint8_t* dst = out + (image * H + i * zoom + b) * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<uint8_t>(label[x]);
      }
    }
  });
}

at::Tensor segmentation_head_cpu(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                                 int64_t zoom) {
  check_segmentation_head_args(features, weight, bias, zoom, false);
  const int64_t n = features.size(0), c = weight.size(0), h = features.size(2), w = features.size(3);
  const auto [H, W] = zoomed_size(features, zoom);
  const at::MemoryFormat layout = memory_format_of(features);
  at::Tensor out = at::empty({n, c, H, W}, features.options().memory_format(layout));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "segmentation_head_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool classes_first = layout == at::MemoryFormat::Contiguous;
    const at::Tensor low = low_resolution_logits(features, weight, bias, c10::CppTypeToScalarType<acc_t>::value,
                                                 classes_first);
    if (classes_first) {
      zoom_planes(low.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n * c, h, w, zoom);
    } else {
      zoom_rows_channels_last(low.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n, c, h, w, zoom);
    }
  });
  return out;
}

at::Tensor segmentation_head_labels_cpu(const at::Tensor& features, const at::Tensor& weight,
                                        const at::Tensor& bias, int64_t zoom) {
  check_segmentation_head_args(features, weight, bias, zoom, true);
  const int64_t n = features.size(0), c = weight.size(0), h = features.size(2), w = features.size(3);
  const auto [H, W] = zoomed_size(features, zoom);
  at::Tensor out = at::empty({n, H, W}, features.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "segmentation_head_labels_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor low = low_resolution_logits(features, weight, bias, c10::CppTypeToScalarType<acc_t>::value,
                                                 true);
    zoom_labels(low.const_data_ptr<acc_t>(), out.mutable_data_ptr<uint8_t>(), n, c, h, w, zoom);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icnet, CPU, m) {
  m.impl("segmentation_head", &segmentation_head_cpu);
  m.impl("segmentation_head_labels", &segmentation_head_labels_cpu);
}

}  // namespace icnet
