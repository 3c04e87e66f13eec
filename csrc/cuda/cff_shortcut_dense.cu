// The exact CFF shortcut for float16 and bfloat16 on CUDA, with the dense work on the tensor cores.
//
// The shortcut (common/cff_geometry.h) splits the op into two convolutions and an elementwise pass: the
// 3x3 conv of low at low resolution and the 1x1 projection of high are cuDNN convolutions (tensor cores,
// float32 accumulation), and one kernel writes, per output element, the bilinear 2x gather of the
// low-resolution conv plus the projection and bias, adds the closed-form border corrections
// (cpu/cff_border.h) on the border rows and columns, and applies ReLU: three launches in all. This is
// the CPU kernel's arithmetic (cpu/cascade_feature_fusion.cpp) with cuDNN in oneDNN's place. float32 and
// float64 keep the implicit-GEMM kernel (cascade_feature_fusion.cu), whose arithmetic is exact float32
// where cuDNN may use TF32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cff_args.h"
#include "common/resize.h"
#include "cuda/cff_shortcut_dense.h"
#include "cuda/strides.h"

namespace icnet {
namespace {

constexpr int kThreads = 256;

struct EpilogueShape {
  int64_t N, Cl, Co, h, w, H, W;
  bool channels_last;  // the output's layout, which the element index follows so that stores coalesce
};

// The shortcut's border corrections (cpu/cff_border.h) for one output element, computed where they
// are needed: 2-5% of the elements of ICNet's maps, each one or two sums of 3 * Cl products, cheaper
// than launching the dozen small ops of the ATen form. low_n: batch item n of low; w_co: weight[co]
// ([Cl, 3, 3], contiguous).

// -1/2 conv1d_x,dil2(up_x(low[:, row, :]), weight[co, :, ky, :]) at x: the row terms, direct form along x.
template <typename scalar_t, typename T>
__device__ T row_correction(const EpilogueShape& s, const scalar_t* low_n, const Strides& ls, const scalar_t* w_co,
                            int64_t row, int ky, int64_t x) {
  T sum = T(0);
  for (int kx = 0; kx < 3; ++kx) {
    const int64_t at = x + 2 * (kx - 1);
    if (at < 0 || at >= s.W) continue;  // the dilated conv's zero padding
    const LinearTaps<T> tx = resize_taps<T>(at, s.w, s.W, true);
    for (int64_t c = 0; c < s.Cl; ++c) {
      const scalar_t* r = low_n + c * ls.c + row * ls.y;
      const T up = tx.w0 * static_cast<T>(r[tx.i0 * ls.x]) + tx.w1 * static_cast<T>(r[tx.i1 * ls.x]);
      sum += static_cast<T>(w_co[c * 9 + ky * 3 + kx]) * up;
    }
  }
  return T(-0.5) * sum;
}

// conv1d_y(low[:, :, col], weight[co, :, :, kx]) at low row yy, padding 1.
template <typename scalar_t, typename T>
__device__ T column_conv(const EpilogueShape& s, const scalar_t* low_n, const Strides& ls, const scalar_t* w_co,
                         int64_t col, int kx, int64_t yy) {
  T sum = T(0);
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t at = yy + ky - 1;
    if (at < 0 || at >= s.h) continue;
    for (int64_t c = 0; c < s.Cl; ++c)
      sum += static_cast<T>(w_co[c * 9 + ky * 3 + kx]) * static_cast<T>(low_n[c * ls.c + at * ls.y + col * ls.x]);
  }
  return sum;
}

// -1/2 up_y(conv1d_y(low[:, :, col], weight[co, :, :, kx])) at y: the column terms, shortcut form along y.
template <typename scalar_t, typename T>
__device__ T column_correction(const EpilogueShape& s, const scalar_t* low_n, const Strides& ls, const scalar_t* w_co,
                               int64_t col, int kx, int64_t y) {
  const LinearTaps<T> ty = resize_taps<T>(y, s.h, s.H, true);
  return T(-0.5) * (ty.w0 * column_conv<scalar_t, T>(s, low_n, ls, w_co, col, kx, ty.i0) +
                    ty.w1 * column_conv<scalar_t, T>(s, low_n, ls, w_co, col, kx, ty.i1));
}

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads)
cff_shortcut_epilogue_kernel(EpilogueShape s, const scalar_t* __restrict__ conv_low, Strides cs,
                             const scalar_t* __restrict__ proj, Strides ps, const scalar_t* __restrict__ bias,
                             const scalar_t* __restrict__ low, Strides ls, const scalar_t* __restrict__ weight,
                             scalar_t* __restrict__ out, Strides os) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= s.N * s.Co * s.H * s.W) return;
  int64_t n, co, y, x, rest;
  if (s.channels_last) {
    co = i % s.Co;
    rest = i / s.Co;
    x = rest % s.W;
    rest /= s.W;
    y = rest % s.H;
    n = rest / s.H;
  } else {
    x = i % s.W;
    rest = i / s.W;
    y = rest % s.H;
    rest /= s.H;
    co = rest % s.Co;
    n = rest / s.Co;
  }
  // bilinear gather of the low-resolution conv on the exact 2x zoom (align_corners), in resize.h's taps
  const LinearTaps<T> ty = resize_taps<T>(y, s.h, s.H, true);
  const LinearTaps<T> tx = resize_taps<T>(x, s.w, s.W, true);
  const scalar_t* g = conv_low + n * cs.n + co * cs.c;
  const auto at_g = [&](int64_t yy, int64_t xx) { return static_cast<T>(g[yy * cs.y + xx * cs.x]); };
  T v = ty.w0 * (tx.w0 * at_g(ty.i0, tx.i0) + tx.w1 * at_g(ty.i0, tx.i1)) +
        ty.w1 * (tx.w0 * at_g(ty.i1, tx.i0) + tx.w1 * at_g(ty.i1, tx.i1));
  v += static_cast<T>(proj[n * ps.n + co * ps.c + y * ps.y + x * ps.x]) + static_cast<T>(bias[co]);
  const scalar_t* low_n = low + n * ls.n;
  const scalar_t* w_co = weight + co * s.Cl * 9;
  if (y == 1) v += row_correction<scalar_t, T>(s, low_n, ls, w_co, 0, 0, x);
  if (y == s.H - 2) v += row_correction<scalar_t, T>(s, low_n, ls, w_co, s.h - 1, 2, x);
  if (x == 1) v += column_correction<scalar_t, T>(s, low_n, ls, w_co, 0, 0, y);
  if (x == s.W - 2) v += column_correction<scalar_t, T>(s, low_n, ls, w_co, s.w - 1, 2, y);
  v = v < T(0) ? T(0) : v;  // ReLU that keeps NaN, as torch.relu does
  out[n * os.n + co * os.c + y * os.y + x * os.x] = static_cast<scalar_t>(v);
}

template <typename scalar_t>
void launch_epilogue(const CffShape& s, const at::Tensor& conv_low, const at::Tensor& proj, const at::Tensor& bias,
                     const at::Tensor& low, const at::Tensor& weight, at::Tensor& out) {
  const EpilogueShape shape{s.N, s.Cl, s.Co, s.h, s.w, s.H, s.W,
                            cff_output_format(out) == at::MemoryFormat::ChannelsLast};
  const int64_t blocks = (out.numel() + kThreads - 1) / kThreads;
  cff_shortcut_epilogue_kernel<scalar_t, float><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      shape, conv_low.const_data_ptr<scalar_t>(), strides_of(conv_low), proj.const_data_ptr<scalar_t>(),
      strides_of(proj), bias.const_data_ptr<scalar_t>(), low.const_data_ptr<scalar_t>(), strides_of(low),
      weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), strides_of(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool cff_shortcut_dense_applies(const at::Tensor& low, const CffShape& s) {
  return cff_exact_shortcut(s) && (low.scalar_type() == at::kHalf || low.scalar_type() == at::kBFloat16);
}

at::Tensor cff_shortcut_dense_cuda(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                                   const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s) {
  const c10::cuda::CUDAGuard guard(low.device());
  at::Tensor out = at::empty({s.N, s.Co, s.H, s.W}, high.options().memory_format(cff_output_format(high)));
  if (out.numel() == 0) return out;
  const at::Tensor weight = weight_low.contiguous();                                // [Co, Cl, 3, 3]
  const at::Tensor conv_low = at::conv2d(low, weight, {}, 1, 1);                     // [N, Co, h, w]
  const at::Tensor proj = at::conv2d(high, weight_high.reshape({s.Co, s.Ch, 1, 1}));  // [N, Co, H, W]
  const at::Tensor b = bias.contiguous();
  if (low.scalar_type() == at::kHalf) {
    launch_epilogue<at::Half>(s, conv_low, proj, b, low, weight, out);
  } else {
    launch_epilogue<at::BFloat16>(s, conv_low, proj, b, low, weight, out);
  }
  return out;
}

}  // namespace icnet
