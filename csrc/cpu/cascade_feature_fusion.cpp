// Cascade feature fusion on the CPU.
//
// General path: output rows go in blocks, in parallel. For a block, the rows of up(low) that its dilated
// 3x3 taps read are interpolated straight from low into a cache-sized, zero-padded buffer (the upsampled
// map is never stored whole) and convolved there; the 1x1 projection of the same rows is added, then bias
// and ReLU as the block is written.
//
// Tap-first path (any real zoom, common/cff_geometry.h): per block of output channels, the nine taps'
// channel mixes run as one 1x1 convolution of low at low resolution, and the same task sums, per output
// pixel, the nine bilinear gathers at the taps' shifted positions, plus the projection, bias and ReLU.
//
// Exact shortcut (ICNet's 2x zoom with dilation 2, common/cff_geometry.h): the 3x3 conv runs at low
// resolution, and one threaded pass writes the bilinear gather of that result plus the projection, the
// closed-form border corrections, bias and ReLU.
//
// The dense arithmetic goes through ATen's CPU convolution (oneDNN), which beats a BLAS GEMM on the same
// work; inside the parallel region it runs single-threaded per block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cff_args.h"
#include "cpu/cff_border.h"
#include "common/resize.h"
#include "cpu/narrow.h"
#include "cpu/winograd_conv3x3.h"

namespace icnet {
namespace {

// Output pixels per row block: enough work per convolution call, small enough to stay in cache.
constexpr int64_t kPixelsPerBlock = 4096;

// Bilinear source taps of every output position along one axis.
template <typename T>
struct AxisTaps {
  std::vector<LinearTaps<T>> taps;
  AxisTaps(int64_t in_size, int64_t out_size, bool align_corners) {
    for (int64_t p = 0; p < out_size; ++p) taps.push_back(resize_taps<T>(p, in_size, out_size, align_corners));
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
at::Tensor as_opmath(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<T>::value);
}

// Converts a tensor of any dtype and strides into a contiguous T buffer (bias).
template <typename T>
std::vector<T> to_buffer(const at::Tensor& t) {
  const at::Tensor c = as_opmath<T>(t).contiguous();
  return std::vector<T>(c.const_data_ptr<T>(), c.const_data_ptr<T>() + c.numel());
}

// The 3x3 taps a dilated conv over an out_h x out_w map can reach. A side tap at offset +-d with d >= the
// map's extent reads only zero padding, so it is dropped with its padding: the padded buffer then never
// exceeds three times the map, whatever the dilation.
struct DilatedTaps {
  int64_t first_ky, rows, first_kx, cols;  // the kept kernel rows [first_ky, first_ky + rows), columns likewise
  int64_t pad_y, pad_x;

  DilatedTaps(int64_t out_h, int64_t out_w, int64_t d)
      : first_ky(d < out_h ? 0 : 1), rows(d < out_h ? 3 : 1), first_kx(d < out_w ? 0 : 1), cols(d < out_w ? 3 : 1),
        pad_y(d < out_h ? d : 0), pad_x(d < out_w ? d : 0) {}

  at::Tensor weight(const at::Tensor& w) const { return w.narrow(2, first_ky, rows).narrow(3, first_kx, cols); }
};

// The rows of up(low) that one block of output rows reads, interpolated straight from low.
template <typename scalar_t, typename T>
struct UpsampledRows {
  View4d<scalar_t> src;
  int64_t channels, out_h, out_w;
  AxisTaps<T> rows, cols;

  // One row of up(src) for channel c: blend the two source rows, then interpolate along x.
  void upsample_row(int64_t n, int64_t c, int64_t y, T* out, std::vector<T>& blended) const {
    const LinearTaps<T>& ty = rows.taps[y];
    const scalar_t* base = src.plane(n, c);
    const scalar_t* r0 = base + ty.i0 * src.sy;
    const scalar_t* r1 = base + ty.i1 * src.sy;
    const int64_t in_w = cols.taps.back().i1 + 1;
    blended.resize(in_w);
    for (int64_t x = 0; x < in_w; ++x)
      blended[x] = ty.w0 * static_cast<T>(r0[x * src.sx]) + ty.w1 * static_cast<T>(r1[x * src.sx]);
    for (int64_t x = 0; x < out_w; ++x) {
      const LinearTaps<T>& tx = cols.taps[x];
      out[x] = tx.w0 * blended[tx.i0] + tx.w1 * blended[tx.i1];
    }
  }

  // up(src) rows [y0 - pad_y, y1 + pad_y) as [1, Cl, y1 - y0 + 2 pad_y, W + 2 pad_x] in u, zero outside the
  // map: exactly the input a padding-free dilated conv with the given taps needs for output rows [y0, y1).
  at::Tensor block(int64_t n, int64_t y0, int64_t y1, const DilatedTaps& taps, std::vector<T>& u,
                   std::vector<T>& blended) const {
    const int64_t pitch = out_w + 2 * taps.pad_x, urows = y1 - y0 + 2 * taps.pad_y;
    u.assign(channels * urows * pitch, T(0));
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t r = 0; r < urows; ++r) {
        const int64_t y = y0 - taps.pad_y + r;
        if (y >= 0 && y < out_h) upsample_row(n, c, y, u.data() + (c * urows + r) * pitch + taps.pad_x, blended);
      }
    return at::from_blob(u.data(), {1, channels, urows, pitch}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  }
};

// Rows per block so that a block is about kPixelsPerBlock output pixels, yet every thread gets work.
int64_t rows_per_block(int64_t rows, int64_t width, int64_t batch) {
  const int64_t by_cache = std::max<int64_t>(1, kPixelsPerBlock / width);
  const int64_t tasks_wanted = 2 * at::get_num_threads();
  const int64_t by_balance = std::max<int64_t>(1, (rows * batch + tasks_wanted - 1) / tasks_wanted);
  return std::min(by_cache, by_balance);
}

// The 1x1 projection over the whole batch (ATen's convolution, all threads), and the tensor the fused pass
// writes: the projection itself when dtype and layout agree, since the pass reads each of its elements once,
// just before writing the same element of the output (one full-size allocation, and its page faults, fewer).
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> projection_and_output(const at::Tensor& high, const at::Tensor& weight_high,
                                                        const CffShape& s) {
  using T = at::opmath_type<scalar_t>;
  at::Tensor proj = at::conv2d(as_opmath<T>(high), as_opmath<T>(weight_high).view({s.Co, s.Ch, 1, 1}));
  const at::MemoryFormat format = cff_output_format(high);
  at::Tensor out = std::is_same_v<scalar_t, T> && proj.is_contiguous(format)
                       ? proj
                       : at::empty({s.N, s.Co, s.H, s.W}, high.options().memory_format(format));
  return {proj, out};
}

template <typename scalar_t>
at::Tensor cff_general_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                           const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s) {
  using T = at::opmath_type<scalar_t>;
  const DilatedTaps taps(s.H, s.W, s.dilation);
  const at::Tensor w_low = taps.weight(as_opmath<T>(weight_low)).contiguous();
  at::Tensor proj, out;
  std::tie(proj, out) = projection_and_output<scalar_t>(high, weight_high, s);
  const View4d<T> pr(proj);
  const std::vector<T> b = to_buffer<T>(bias);
  scalar_t* y_out = out.mutable_data_ptr<scalar_t>();
  const int64_t on = out.stride(0), oc = out.stride(1), oy = out.stride(2), ox = out.stride(3);
  const UpsampledRows<scalar_t, T> up{View4d<scalar_t>(low), s.Cl, s.H, s.W,
                                      AxisTaps<T>(s.h, s.H, s.align_corners), AxisTaps<T>(s.w, s.W, s.align_corners)};
  const int64_t R = rows_per_block(s.H, s.W, s.N);
  const int64_t blocks = (s.H + R - 1) / R;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> u, blended;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, y0 = (task % blocks) * R, y1 = std::min(s.H, y0 + R);
      const at::Tensor conv = at::conv2d(up.block(n, y0, y1, taps, u, blended), w_low, std::nullopt,
                                         at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                                         at::IntArrayRef{taps.rows == 3 ? s.dilation : 1, taps.cols == 3 ? s.dilation : 1})
                                  .contiguous();  // [1, Co, R, W]
      const T* acc = conv.const_data_ptr<T>();
      for (int64_t co = 0; co < s.Co; ++co)
        for (int64_t y = y0; y < y1; ++y) {
          const T* src = acc + (co * (y1 - y0) + (y - y0)) * s.W;
          const T* p = pr.plane(n, co) + y * pr.sy;
          scalar_t* dst = y_out + n * on + co * oc + y * oy;
          for (int64_t x = 0; x < s.W; ++x)
            dst[x * ox] = static_cast<scalar_t>(std::max(src[x] + p[x * pr.sx] + b[co], T(0)));
        }
    }
  });
  return out;
}

// One output row of the exact 2x zoom along y: source row r0 (even rows, weights 1 and 0 on r0 and r1) or
// the mean of rows r0 and r1 (odd rows), over w columns.
template <typename T>
void zoom_2x(const T* r0, const T* r1, bool odd, int64_t w, T* out) {
  const T w0 = odd ? T(0.5) : T(1), w1 = odd ? T(0.5) : T(0);
  for (int64_t x = 0; x < w; ++x) out[x] = w0 * r0[x] + w1 * r1[x];
}

// Output channels per tap-first task: its nine maps (9 * 16 channels at low resolution) are computed by one
// single-threaded 1x1 convolution inside the task and gathered while they are still in cache.
constexpr int64_t kTapFirstChannels = 16;

// Output positions [begin, end) along one axis whose tap at offset `shift` lands inside the map (outside
// is the conv's zero padding, skipped rather than weighted by zero so that no NaN leaks in from there).
std::pair<int64_t, int64_t> inside_range(int64_t size, int64_t shift) {
  return {std::max<int64_t>(0, -shift), std::min(size, size - shift)};
}

template <typename scalar_t>
at::Tensor cff_tap_first_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                             const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s) {
  using T = at::opmath_type<scalar_t>;
  // [Co, Cl, 3, 3] -> [Co, 3, 3, Cl] -> [Co * 9, Cl, 1, 1]: channel co * 9 + tap of the maps is tap's mix for
  // co, so a block of output channels owns a contiguous range of map channels
  const at::Tensor tap_weights = as_opmath<T>(weight_low).permute({0, 2, 3, 1}).reshape({s.Co * 9, s.Cl, 1, 1});
  const at::Tensor low_t = as_opmath<T>(low);
  at::Tensor proj, out;
  std::tie(proj, out) = projection_and_output<scalar_t>(high, weight_high, s);
  const View4d<T> pr(proj);
  const std::vector<T> b = to_buffer<T>(bias);
  const AxisTaps<T> rows(s.h, s.H, s.align_corners), cols(s.w, s.W, s.align_corners);
  scalar_t* y_out = out.mutable_data_ptr<scalar_t>();
  const int64_t on = out.stride(0), oc = out.stride(1), oy = out.stride(2), ox = out.stride(3);
  const int64_t plane = s.h * s.w, d = s.dilation;
  const int64_t blocks = (s.Co + kTapFirstChannels - 1) / kTapFirstChannels;
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> blended(s.w), acc(s.W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kTapFirstChannels;
      const int64_t c1 = std::min(s.Co, c0 + kTapFirstChannels);
      const at::Tensor maps =
          at::conv2d(low_t.narrow(0, n, 1), tap_weights.narrow(0, c0 * 9, (c1 - c0) * 9)).contiguous();
      for (int64_t co = c0; co < c1; ++co) {
        const T* co_maps = maps.const_data_ptr<T>() + (co - c0) * 9 * plane;  // [9, h, w]
        for (int64_t y = 0; y < s.H; ++y) {
          const T* p = pr.plane(n, co) + y * pr.sy;
          for (int64_t x = 0; x < s.W; ++x) acc[x] = p[x * pr.sx] + b[co];
          for (int64_t ky = 0; ky < 3; ++ky) {
            const int64_t ys = y + (ky - 1) * d;
            if (ys < 0 || ys >= s.H) continue;
            const LinearTaps<T>& ty = rows.taps[ys];
            for (int64_t kx = 0; kx < 3; ++kx) {
              const T* map = co_maps + (ky * 3 + kx) * plane;
              const T* r0 = map + ty.i0 * s.w;
              const T* r1 = map + ty.i1 * s.w;
              for (int64_t x = 0; x < s.w; ++x) blended[x] = ty.w0 * r0[x] + ty.w1 * r1[x];
              const int64_t shift = (kx - 1) * d;
              const auto [x_begin, x_end] = inside_range(s.W, shift);
              for (int64_t x = x_begin; x < x_end; ++x) {
                const LinearTaps<T>& tx = cols.taps[x + shift];
                acc[x] += tx.w0 * blended[tx.i0] + tx.w1 * blended[tx.i1];
              }
            }
          }
          scalar_t* dst = y_out + n * on + co * oc + y * oy;
          for (int64_t x = 0; x < s.W; ++x) dst[x * ox] = static_cast<scalar_t>(std::max(acc[x], T(0)));
        }
      }
    }
  });
  return out;
}

// The shortcut's 3x3 conv at low resolution, contiguous: Winograd's F(2x2, 3x3) (2.25x fewer multiplies,
// cpu/winograd_conv3x3.h) in float32 arithmetic where it pays, else ATen's direct convolution.
at::Tensor conv3x3_low_resolution(const at::Tensor& low, const at::Tensor& weight) {
  if (low.scalar_type() == at::kFloat && winograd_f2_pays(low, weight.size(0))) return conv3x3_winograd_f2(low, weight);
  return at::conv2d(low, weight, {}, 1, 1).contiguous();
}

// Exact shortcut: the 3x3 conv at low resolution and the 1x1 projection run over the whole batch; one
// threaded pass then adds the bilinear gather of the low-resolution conv, the border corrections, bias and
// ReLU.
template <typename scalar_t>
at::Tensor cff_shortcut_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                            const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s) {
  using T = at::opmath_type<scalar_t>;
  const at::Tensor low_t = as_opmath<T>(low), weight_t = as_opmath<T>(weight_low);
  const at::Tensor conv_low = conv3x3_low_resolution(low_t, weight_t);
  at::Tensor proj, out;
  std::tie(proj, out) = projection_and_output<scalar_t>(high, weight_high, s);
  const ShortcutBorder border = shortcut_border(low_t, weight_t, s);
  const View4d<T> cl(conv_low), pr(proj);
  const T* top = border.top.const_data_ptr<T>();  // [N, Co, W]
  const T* bottom = border.bottom.const_data_ptr<T>();
  const T* left = border.left.const_data_ptr<T>();  // [N, Co, H]
  const T* right = border.right.const_data_ptr<T>();
  const std::vector<T> b = to_buffer<T>(bias);
  scalar_t* y_out = out.mutable_data_ptr<scalar_t>();
  const int64_t on = out.stride(0), oc = out.stride(1), oy = out.stride(2), ox = out.stride(3);
  // Output row y of channel co (plane task = n * Co + co) before the ReLU, into row[0, W).
  const auto pre_activation_row = [&](int64_t task, int64_t y, T* blended, T* row) {
    const int64_t n = task / s.Co, co = task % s.Co;
    const T* low_plane = cl.plane(n, co);
    // bilinear gather of the low-resolution conv, blending its two rows and then along x. On the exact
    // 2x zoom with align_corners the taps are fixed: an even position takes (1, 0) of sources (k, k+1),
    // an odd one (1/2, 1/2). Written out, the loops vectorise; the products are those of the general
    // taps (resize.h), zero weights included, so NaN and inf travel exactly as there.
    zoom_2x(low_plane + (y / 2) * cl.sy, low_plane + std::min(y / 2 + 1, s.h - 1) * cl.sy, y % 2 == 1, s.w,
            blended);
    const T* p = pr.plane(n, co) + y * pr.sy;
    for (int64_t x = 0; x < s.w; ++x) {
      const int64_t next = std::min(x + 1, s.w - 1);
      row[2 * x] = blended[x] + T(0) * blended[next];
      if (x + 1 < s.w) row[2 * x + 1] = T(0.5) * blended[x] + T(0.5) * blended[next];
    }
    for (int64_t x = 0; x < s.W; ++x) row[x] += p[x * pr.sx] + b[co];
    if (y == 1)
      for (int64_t x = 0; x < s.W; ++x) row[x] += top[task * s.W + x];
    if (y == s.H - 2)
      for (int64_t x = 0; x < s.W; ++x) row[x] += bottom[task * s.W + x];
    row[1] += left[task * s.H + y];
    row[s.W - 2] += right[task * s.H + y];
  };
  RECORD_FUNCTION("icnet::cff_shortcut_pass", {});  // to the end of the function: the pass alone
  if (oc == 1 && ox == s.Co) {
    // channels_last: a task is one output row of one image, all channels, so that every store is
    // contiguous; the channels' rows meet in a cache-resident [W, Co] buffer.
    at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> blended(s.w), row(s.W), pixels(s.W * s.Co);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / s.H, y = task % s.H;
        for (int64_t co = 0; co < s.Co; ++co) {
          pre_activation_row(n * s.Co + co, y, blended.data(), row.data());
          for (int64_t x = 0; x < s.W; ++x) pixels[x * s.Co + co] = std::max(row[x], T(0));
        }
        store_row(pixels.data(), y_out + n * on + y * oy, s.W * s.Co);
      }
    });
    return out;
  }
  at::parallel_for(0, s.N * s.Co, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> blended(s.w), row(s.W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.Co, co = task % s.Co;
      for (int64_t y = 0; y < s.H; ++y) {
        pre_activation_row(task, y, blended.data(), row.data());
        scalar_t* dst = y_out + n * on + co * oc + y * oy;
        for (int64_t x = 0; x < s.W; ++x) row[x] = std::max(row[x], T(0));
        if (ox == 1) {
          store_row(row.data(), dst, s.W);
        } else {
          for (int64_t x = 0; x < s.W; ++x) dst[x * ox] = static_cast<scalar_t>(row[x]);
        }
      }
    }
  });
  return out;
}

at::Tensor cascade_feature_fusion_cpu(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                                      const at::Tensor& weight_high, const at::Tensor& bias, int64_t dilation,
                                      bool align_corners) {
  const CffShape s = make_cff_shape(low, high, weight_low, weight_high, bias, dilation, align_corners);
  if (s.N == 0) return at::empty({s.N, s.Co, s.H, s.W}, high.options().memory_format(cff_output_format(high)));
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, low.scalar_type(), "cascade_feature_fusion_cpu", [&] {
    if (cff_exact_shortcut(s)) return cff_shortcut_cpu<scalar_t>(low, high, weight_low, weight_high, bias, s);
    if (cff_tap_first(s)) return cff_tap_first_cpu<scalar_t>(low, high, weight_low, weight_high, bias, s);
    return cff_general_cpu<scalar_t>(low, high, weight_low, weight_high, bias, s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(icnet, CPU, m) { m.impl("cascade_feature_fusion", &cascade_feature_fusion_cpu); }

}  // namespace icnet
