// Summed pyramid pooling on the CPU: planes in parallel, each read once into a cache-resident buffer,
// reduced to the pooled grid of every bin and written once with the resized bins added.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/layout.h"
#include "common/pyramid_args.h"
#include "cpu/narrow.h"
#include "cpu/relayout.h"

namespace icnet {
namespace {

constexpr int64_t kRowsTogether = 4;  // output rows expanded together, see below

// One axis's reduce or expand matrix [rows, length] with the nonzero band [lo, hi) of each row.
template <typename T>
struct BandedMatrix {
  int64_t length = 0;
  std::vector<T> weight;
  std::vector<int64_t> lo, hi;

  template <typename WeightFn>
  BandedMatrix(int rows, int64_t len, WeightFn fn) : length(len), weight(rows * len), lo(rows, len), hi(rows, 0) {
    for (int r = 0; r < rows; ++r) {
      for (int64_t p = 0; p < len; ++p) {
        const T w = fn(r, p);
        weight[r * len + p] = w;
        if (w != T(0)) {
          lo[r] = std::min(lo[r], p);
          hi[r] = std::max(hi[r], p + 1);
        }
      }
    }
  }
  const T* row(int r) const { return weight.data() + r * length; }
};

template <typename scalar_t>
void pyramid_apply_cpu(const at::Tensor& in, at::Tensor& out, const PyramidGeometry& g, PyramidDirection dir) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int rows = g.rows;
  const auto reduce = [&](int axis) {
    return BandedMatrix<T>(rows, g.length[axis], [&](int r, int64_t p) { return reduce_weight<T>(g, dir, axis, r, p); });
  };
  const auto expand = [&](int axis) {
    return BandedMatrix<T>(rows, g.length[axis], [&](int r, int64_t p) { return expand_weight<T>(g, dir, axis, r, p); });
  };
  const BandedMatrix<T> reduce_h = reduce(0), reduce_w = reduce(1), expand_h = expand(0), expand_w = expand(1);
  std::vector<int> bin_begin(rows), bin_end(rows);
  for (int r = 0; r < rows; ++r) {
    const int b = bin_of_row(g, r);
    bin_begin[r] = g.row_offset[b];
    bin_end[r] = g.row_offset[b + 1];
  }

  const scalar_t* src = in.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t in_sn = in.stride(0), in_sc = in.stride(1), in_sh = in.stride(2), in_sw = in.stride(3);
  const int64_t out_sn = out.stride(0), out_sc = out.stride(1), out_sh = out.stride(2), out_sw = out.stride(3);

  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> plane(H * W), reduced_h(rows * W), pooled(rows * rows), expanded_h(H * rows),
        out_rows(kRowsTogether * W);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const scalar_t* x = src + n * in_sn + c * in_sc;
      scalar_t* y = dst + n * out_sn + c * out_sc;
      for (int64_t h = 0; h < H; ++h) {
        if (in_sw == 1) {  // the common case, spelled out so that it vectorises
          std::copy_n(x + h * in_sh, W, plane.data() + h * W);
        } else {
          for (int64_t w = 0; w < W; ++w) plane[h * W + w] = static_cast<T>(x[h * in_sh + w * in_sw]);
        }
      }
      // reduced_h[i, w] = sum_h reduce_h[i, h] * plane[h, w], whole rows at a time so the inner loop runs
      // along w and vectorises. h is the outer loop: consecutive updates then go to different rows i, and
      // no accumulator waits on its own previous store.
      std::fill(reduced_h.begin(), reduced_h.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        const T* prow = plane.data() + h * W;
        for (int i = 0; i < rows; ++i) {
          if (h < reduce_h.lo[i] || h >= reduce_h.hi[i]) continue;
          const T weight = reduce_h.row(i)[h];
          T* acc = reduced_h.data() + i * W;
          for (int64_t w = 0; w < W; ++w) acc[w] += weight * prow[w];
        }
      }
      // pooled[i, j] = sum_w reduced_h[i, w] * reduce_w[j, w], for i and j of the same bin
      for (int i = 0; i < rows; ++i) {
        const T* rrow = reduced_h.data() + i * W;
        for (int j = bin_begin[i]; j < bin_end[i]; ++j) {
          const T* wrow = reduce_w.row(j);
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t w = reduce_w.lo[j]; w < reduce_w.hi[j]; ++w) acc += rrow[w] * wrow[w];
          pooled[i * rows + j] = acc;
        }
      }
      // expanded_h[h, j] = sum_i expand_h[i, h] * pooled[i, j], i over j's bin
      std::fill(expanded_h.begin(), expanded_h.end(), T(0));
      for (int i = 0; i < rows; ++i) {
        const T* hrow = expand_h.row(i);
        const T* prow = pooled.data() + i * rows;
        for (int64_t h = expand_h.lo[i]; h < expand_h.hi[i]; ++h)
          for (int j = bin_begin[i]; j < bin_end[i]; ++j) expanded_h[h * rows + j] += hrow[h] * prow[j];
      }
      // out[h, w] = plane[h, w] + sum_j expanded_h[h, j] * expand_w[j, w], kRowsTogether output rows at a
      // time, alternating between them for the same reason as above.
      for (int64_t h0 = 0; h0 < H; h0 += kRowsTogether) {
        const int64_t count = std::min<int64_t>(kRowsTogether, H - h0);
        std::copy(plane.begin() + h0 * W, plane.begin() + (h0 + count) * W, out_rows.begin());
        for (int j = 0; j < rows; ++j) {
          const T* wrow = expand_w.row(j);
          for (int64_t r = 0; r < count; ++r) {
            const T v = expanded_h[(h0 + r) * rows + j];
            T* orow = out_rows.data() + r * W;
            for (int64_t w = expand_w.lo[j]; w < expand_w.hi[j]; ++w) orow[w] += v * wrow[w];
          }
        }
        for (int64_t r = 0; r < count; ++r) {
          scalar_t* yrow = y + (h0 + r) * out_sh;
          const T* orow = out_rows.data() + r * W;
          if (out_sw == 1) {
            store_row(orow, yrow, W);
          } else {
            for (int64_t w = 0; w < W; ++w) yrow[w * out_sw] = static_cast<scalar_t>(orow[w]);
          }
        }
      }
    }
  });
}

at::Tensor pyramid_apply(const at::Tensor& in, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                         c10::IntArrayRef strides, bool align_corners, PyramidDirection dir, const char* op) {
  const PyramidGeometry g = make_pyramid_geometry(in, bins, kernel_sizes, strides, align_corners, op);
  // a channels_last map's planes lie at the channel stride: the kernel, which works plane by plane, runs on
  // an NCHW copy, and its output returns to the input's layout
  const bool channels_last = memory_format_of(in) == at::MemoryFormat::ChannelsLast && in.numel() > 0;
  const at::Tensor planes = channels_last ? relayout_cpu(in, false) : in;
  at::Tensor out = at::empty_like(planes);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "pyramid_pool_sum_cpu",
                                  [&] { pyramid_apply_cpu<scalar_t>(planes, out, g, dir); });
  return channels_last ? relayout_cpu(out, true) : out;
}

}  // namespace

at::Tensor pyramid_pool_sum_cpu(const at::Tensor& x, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                                c10::IntArrayRef strides, bool align_corners) {
  return pyramid_apply(x, bins, kernel_sizes, strides, align_corners, PyramidDirection::kForward,
                       "pyramid_pool_sum");
}

at::Tensor pyramid_pool_sum_backward_cpu(const at::Tensor& grad_out, c10::IntArrayRef bins,
                                         c10::IntArrayRef kernel_sizes, c10::IntArrayRef strides,
                                         bool align_corners) {
  return pyramid_apply(grad_out, bins, kernel_sizes, strides, align_corners, PyramidDirection::kAdjoint,
                       "pyramid_pool_sum_backward");
}

TORCH_LIBRARY_IMPL(icnet, CPU, m) {
  m.impl("pyramid_pool_sum", &pyramid_pool_sum_cpu);
  m.impl("pyramid_pool_sum_backward", &pyramid_pool_sum_backward_cpu);
}

}  // namespace icnet
