// Cascade feature fusion on the CPU.
//
// Output rows go in blocks, in parallel. For a block, the rows of up(low) that its dilated 3x3 taps read
// are interpolated straight from low into a zero-padded buffer U (the upsampled map is never stored
// whole), and the conv is nine BLAS GEMMs over shifted views of U ("shifted GEMM": each tap's operand is
// U offset by the tap, read with U's padded row pitch, so no im2col copy is made). The 1x1 projection is
// one more GEMM into the same accumulator; bias and ReLU are applied as the block is written.
//
// With ICNet's exact 2x zoom and dilation 2 (common/cff_geometry.h), the 3x3 conv runs at low resolution
// with the same routine; the full-resolution pass is then the projection GEMM plus a bilinear gather of
// the low-resolution result, and the border rows and columns are convolved directly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cff_args.h"
#include "common/resize.h"

namespace icnet {
namespace {

// GEMM columns per row block: wide enough for BLAS to run near peak, small enough to stay in cache.
constexpr int64_t kColumnsPerBlock = 1024;

// Bilinear source taps of every output position along one axis.
template <typename T>
struct AxisTaps {
  std::vector<LinearTaps<T>> taps;
  AxisTaps(int64_t in_size, int64_t out_size, bool align_corners) {
    const T scale = resize_scale<T>(in_size, out_size, align_corners);
    for (int64_t p = 0; p < out_size; ++p) taps.push_back(linear_taps<T>(p, in_size, scale, align_corners));
  }
};

template <typename scalar_t>
struct View4d {
  const scalar_t* data;
  int64_t sn, sc, sy, sx;
  explicit View4d(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sn(t.stride(0)), sc(t.stride(1)), sy(t.stride(2)), sx(t.stride(3)) {}
  const scalar_t* plane(int64_t n, int64_t c) const { return data + n * sn + c * sc; }
};

template <typename T>
at::Tensor wrap(const T* data, c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  return at::from_blob(const_cast<T*>(data), sizes, strides, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out[co, j] (+)= sum_k a[co, k] * b[k, j]: ATen's BLAS GEMM on buffers (single-threaded inside parallel_for).
template <typename T>
void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  if (accumulate) {
    at::addmm_out(out, out, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// Converts a tensor of any dtype and strides into a contiguous T buffer (weights, bias).
template <typename T>
std::vector<T> to_buffer(const at::Tensor& t) {
  const at::Tensor c = t.contiguous().to(c10::CppTypeToScalarType<T>::value);
  return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + c.numel());
}

// A dilated 3x3 conv over up(src), src resized to out_h x out_w (the identity when the sizes agree).
template <typename scalar_t, typename T>
struct UpsampledConv {
  View4d<scalar_t> src;
  int64_t channels, out_h, out_w, dilation, co;
  AxisTaps<T> rows, cols;
  const T* weight_by_tap;  // [9, Co, Cl]: one GEMM operand per tap
  const T* weight_flat;    // [Co, 9 * Cl], tap-major: one GEMM over gathered points

  int64_t pitch() const { return out_w + 2 * dilation; }  // U's padded row length, and acc's

  // One row of up(src) for channel c: blend the two source rows, then interpolate along x.
  void upsample_row(int64_t n, int64_t c, int64_t y, T* out, std::vector<T>& blended) const {
    const LinearTaps<T>& ty = rows.taps[y];
    const scalar_t* base = src.plane(n, c);
    const scalar_t* r0 = base + ty.i0 * src.sy;
    const scalar_t* r1 = base + ty.i1 * src.sy;
    const int64_t in_w = cols.taps.empty() ? 0 : cols.taps.back().i1 + 1;
    blended.resize(in_w);
    for (int64_t x = 0; x < in_w; ++x)
      blended[x] = ty.w0 * static_cast<T>(r0[x * src.sx]) + ty.w1 * static_cast<T>(r1[x * src.sx]);
    for (int64_t x = 0; x < out_w; ++x) {
      const LinearTaps<T>& tx = cols.taps[x];
      out[x] = tx.w0 * blended[tx.i0] + tx.w1 * blended[tx.i1];
    }
  }

  // acc[co, r * pitch() + x] (+)= conv at output (y0 + r, x) for rows [y0, y1); columns x >= out_w are junk.
  void rows_into(int64_t n, int64_t y0, int64_t y1, T* acc, bool accumulate, std::vector<T>& u,
                 std::vector<T>& blended) const {
    const int64_t d = dilation, P = pitch(), R = y1 - y0, urows = R + 2 * d;
    // each channel's U plane has d*2 slack elements so the last tap's view stays inside the buffer
    const int64_t plane = urows * P + 2 * d;
    u.assign(channels * plane, T(0));
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t r = 0; r < urows; ++r) {
        const int64_t y = y0 - d + r;
        if (y >= 0 && y < out_h) upsample_row(n, c, y, u.data() + c * plane + r * P + d, blended);
      }
    }
    at::Tensor out = wrap(acc, {co, R * P}, {R * P, 1});
    for (int tap = 0; tap < 9; ++tap) {
      const int64_t offset = (tap / 3) * d * P + (tap % 3) * d;
      const at::Tensor b = wrap(u.data() + offset, {channels, R * P}, {plane, 1});
      const at::Tensor a = wrap(weight_by_tap + tap * co * channels, {co, channels}, {channels, 1});
      gemm<T>(a, b, out, accumulate || tap > 0);
    }
  }

  // up(src) at one output position, zero outside the map.
  T upsampled_at(int64_t n, int64_t c, int64_t y, int64_t x) const {
    if (y < 0 || y >= out_h || x < 0 || x >= out_w) return T(0);
    const LinearTaps<T>& ty = rows.taps[y];
    const LinearTaps<T>& tx = cols.taps[x];
    const scalar_t* base = src.plane(n, c);
    const auto at_src = [&](int64_t i, int64_t j) { return static_cast<T>(base[i * src.sy + j * src.sx]); };
    return ty.w0 * (tx.w0 * at_src(ty.i0, tx.i0) + tx.w1 * at_src(ty.i0, tx.i1)) +
           ty.w1 * (tx.w0 * at_src(ty.i1, tx.i0) + tx.w1 * at_src(ty.i1, tx.i1));
  }

  // out[co, j] = conv at output (ys[j], xs[j]): for a few scattered pixels.
  void points_into(int64_t n, const std::vector<int64_t>& ys, const std::vector<int64_t>& xs, T* out,
                   std::vector<T>& patch) const {
    const int64_t count = static_cast<int64_t>(ys.size());
    patch.resize(9 * channels * count);
    for (int tap = 0; tap < 9; ++tap)
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t j = 0; j < count; ++j)
          patch[(tap * channels + c) * count + j] = upsampled_at(
              n, c, ys[j] + cff_tap_offset(tap / 3, dilation), xs[j] + cff_tap_offset(tap % 3, dilation));
    at::Tensor o = wrap(out, {co, count}, {count, 1});
    gemm<T>(wrap(weight_flat, {co, 9 * channels}, {9 * channels, 1}), wrap(patch.data(), {9 * channels, count}, {count, 1}),
            o, false);
  }
};

// Rows per block so that a block is about kColumnsPerBlock GEMM columns, yet every thread gets work.
int64_t rows_per_block(int64_t rows, int64_t pitch, int64_t batch) {
  const int64_t by_cache = std::max<int64_t>(1, kColumnsPerBlock / pitch);
  const int64_t tasks_wanted = 4 * at::get_num_threads();
  const int64_t by_balance = std::max<int64_t>(1, (rows * batch + tasks_wanted - 1) / tasks_wanted);
  return std::min(by_cache, by_balance);
}

template <typename scalar_t>
void cff_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
             const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const std::vector<T> w_by_tap = to_buffer<T>(weight_low.permute({2, 3, 0, 1}));  // [3, 3, Co, Cl]
  const std::vector<T> w_flat = to_buffer<T>(weight_low.permute({0, 2, 3, 1}));    // [Co, 3, 3, Cl]
  const std::vector<T> w_high = to_buffer<T>(weight_high);
  const std::vector<T> b = to_buffer<T>(bias);
  const View4d<scalar_t> hi(high);
  const View4d<scalar_t> lo(low);
  scalar_t* y_out = out.mutable_data_ptr<scalar_t>();
  const int64_t on = out.stride(0), oc = out.stride(1), oy = out.stride(2), ox = out.stride(3);
  const bool shortcut = cff_exact_shortcut(s);
  const UpsampledConv<scalar_t, T> full{lo, s.Cl, s.H, s.W, s.dilation, s.Co,
                                        AxisTaps<T>(s.h, s.H, s.align_corners), AxisTaps<T>(s.w, s.W, s.align_corners),
                                        w_by_tap.data(), w_flat.data()};

  // Shortcut stage 1: the 3x3 conv at low resolution (dilation 1, no resize), as T [N, Co, h, w].
  std::vector<T> conv_low;
  if (shortcut) {
    const UpsampledConv<scalar_t, T> at_low{lo, s.Cl, s.h, s.w, 1, s.Co, AxisTaps<T>(s.h, s.h, true),
                                            AxisTaps<T>(s.w, s.w, true), w_by_tap.data(), w_flat.data()};
    conv_low.resize(s.N * s.Co * s.h * s.w);
    const int64_t R = rows_per_block(s.h, at_low.pitch(), s.N);
    const int64_t blocks = (s.h + R - 1) / R;
    at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc, u, blended;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, y0 = (task % blocks) * R, y1 = std::min(s.h, y0 + R);
        const int64_t P = at_low.pitch();
        acc.resize(s.Co * (y1 - y0) * P);
        at_low.rows_into(n, y0, y1, acc.data(), false, u, blended);
        for (int64_t co = 0; co < s.Co; ++co)
          for (int64_t y = y0; y < y1; ++y)
            std::copy_n(acc.data() + co * (y1 - y0) * P + (y - y0) * P, s.w,
                        conv_low.data() + ((n * s.Co + co) * s.h + y) * s.w);
      }
    });
  }

  const AxisTaps<T> zoom_rows(s.h, s.H, true), zoom_cols(s.w, s.W, true);
  std::vector<int64_t> border_cols{1};
  if (s.W - 2 != 1) border_cols.push_back(s.W - 2);
  const int64_t P = full.pitch();
  const int64_t R = rows_per_block(s.H, P, s.N);
  const int64_t blocks = (s.H + R - 1) / R;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc, high_block, u, blended, patch, border_acc, row_acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, y0 = (task % blocks) * R, y1 = std::min(s.H, y0 + R);
      const int64_t cols = (y1 - y0) * P;  // acc[co, (y - y0) * P + x]
      // projection: acc = weight_high . high over the block, in acc's padded pitch
      high_block.assign(s.Ch * cols, T(0));
      for (int64_t c = 0; c < s.Ch; ++c) {
        const scalar_t* plane = hi.plane(n, c);
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t x = 0; x < s.W; ++x)
            high_block[c * cols + (y - y0) * P + x] = static_cast<T>(plane[y * hi.sy + x * hi.sx]);
      }
      acc.resize(s.Co * cols);
      at::Tensor acc_t = wrap(acc.data(), {s.Co, cols}, {cols, 1});
      gemm<T>(wrap(w_high.data(), {s.Co, s.Ch}, {s.Ch, 1}), wrap(high_block.data(), {s.Ch, cols}, {cols, 1}), acc_t,
              false);

      if (!shortcut) {
        full.rows_into(n, y0, y1, acc.data(), true, u, blended);
      } else {
        std::vector<int64_t> ys, xs, slot;
        for (int64_t y = y0; y < y1; ++y) {
          if (y == 1 || y == s.H - 2) {  // a border row: convolve it directly
            row_acc.resize(s.Co * P);
            full.rows_into(n, y, y + 1, row_acc.data(), false, u, blended);
            for (int64_t co = 0; co < s.Co; ++co)
              for (int64_t x = 0; x < s.W; ++x) acc[co * cols + (y - y0) * P + x] += row_acc[co * P + x];
            continue;
          }
          const LinearTaps<T>& ty = zoom_rows.taps[y];
          for (int64_t co = 0; co < s.Co; ++co) {
            const T* plane = conv_low.data() + (n * s.Co + co) * s.h * s.w;
            const T* r0 = plane + ty.i0 * s.w;
            const T* r1 = plane + ty.i1 * s.w;
            T* dst = acc.data() + co * cols + (y - y0) * P;
            for (int64_t x = 0; x < s.W; ++x) {
              const LinearTaps<T>& tx = zoom_cols.taps[x];
              dst[x] += ty.w0 * (tx.w0 * r0[tx.i0] + tx.w1 * r0[tx.i1]) + ty.w1 * (tx.w0 * r1[tx.i0] + tx.w1 * r1[tx.i1]);
            }
          }
          for (const int64_t x : border_cols) {  // undo the gather, convolve directly
            const LinearTaps<T>& tx = zoom_cols.taps[x];
            for (int64_t co = 0; co < s.Co; ++co) {
              const T* plane = conv_low.data() + (n * s.Co + co) * s.h * s.w;
              acc[co * cols + (y - y0) * P + x] -=
                  ty.w0 * (tx.w0 * plane[ty.i0 * s.w + tx.i0] + tx.w1 * plane[ty.i0 * s.w + tx.i1]) +
                  ty.w1 * (tx.w0 * plane[ty.i1 * s.w + tx.i0] + tx.w1 * plane[ty.i1 * s.w + tx.i1]);
            }
            ys.push_back(y);
            xs.push_back(x);
            slot.push_back((y - y0) * P + x);
          }
        }
        if (!ys.empty()) {
          const int64_t count = static_cast<int64_t>(ys.size());
          border_acc.resize(s.Co * count);
          full.points_into(n, ys, xs, border_acc.data(), patch);
          for (int64_t co = 0; co < s.Co; ++co)
            for (int64_t j = 0; j < count; ++j) acc[co * cols + slot[j]] += border_acc[co * count + j];
        }
      }
      // epilogue: bias, ReLU, store in the output's layout
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t y = y0; y < y1; ++y) {
          const T* src = acc.data() + co * cols + (y - y0) * P;
          scalar_t* dst = y_out + n * on + co * oc + y * oy;
          for (int64_t x = 0; x < s.W; ++x) dst[x * ox] = static_cast<scalar_t>(std::max(src[x] + b[co], T(0)));
        }
    }
  });
}

at::Tensor cascade_feature_fusion_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                                      const at::Tensor& weight_high, const at::Tensor& bias, int64_t dilation,
                                      bool align_corners) {
  const CffShape s = make_cff_shape(low, high, weight_low, weight_high, bias, dilation, align_corners);
  at::Tensor out = at::empty({s.N, s.Co, s.H, s.W}, high.options().memory_format(high.suggest_memory_format()));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, low.scalar_type(), "cascade_feature_fusion_cpu",
                                  [&] { cff_cpu<scalar_t>(low, high, weight_low, weight_high, bias, s, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icnet, CPU, m) { m.impl("cascade_feature_fusion", &cascade_feature_fusion_cpu); }

}  // namespace icnet
