// Cascade feature fusion on CUDA: a tiled implicit GEMM. A block computes 64 output pixels x 64 output
// channels; the reduction runs over the nine dilated taps of up(low) (tap-major, k = tap * Cl + c), each A
// element interpolated from low's four bilinear sources as the tile is loaded (the upsampled map is never
// written), then over high's channels for the 1x1 projection. Bias and ReLU are the epilogue.
//
// For the exact 2x zoom with dilation 2 (common/cff_geometry.h) the same kernel runs three times: the 3x3
// conv at low resolution; the full-resolution pass (projection plus a bilinear gather of that conv) for
// all but the border pixels; the direct conv for the border pixels alone.
//
// This kernel accumulates in float32 with CUDA cores, far below the tensor cores' rate, so the shortcut in
// float16 and bfloat16 goes to cuDNN's tensor cores instead (cuda/cff_shortcut_dense.cu); the Triton
// kernel uses tensor cores on every path.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/cff_args.h"
#include "common/resize.h"
#include "cuda/cff_shortcut_dense.h"
#include "cuda/strides.h"

namespace icnet {
namespace {

constexpr int kTileM = 64;  // output pixels per block
constexpr int kTileN = 64;  // output channels per block
constexpr int kTileK = 16;  // reduction slice staged in shared memory
constexpr int kThreads = 256;
constexpr int kMicro = 4;   // each thread: 4 pixels x 4 channels

// What one launch computes (see the file comment).
struct CffLaunch {
  int64_t Cl, h, w, Ch, H, W, Co;
  int64_t num_pixels;   // H*W, or cff_border_count(H, W) with border_only
  int64_t dilation;
  bool align_corners;   // of the resize of low to H x W
  bool taps;            // reduce over the dilated taps of up(low)
  bool proj;            // reduce over high's channels
  bool add_gather;      // add the bilinear 2x gather of `gather` [N, Co, h, w]
  bool border_only;     // the pixels are the shortcut's border pixels (cff_border_pixel), not all H*W
  bool skip_border;     // leave the shortcut's border pixels unwritten
  bool epilogue;        // add bias, apply ReLU
  Strides low, high, gather, out;
};

template <typename scalar_t, typename T, typename out_t>
__global__ void __launch_bounds__(kThreads)
cff_implicit_gemm_kernel(CffLaunch p, const scalar_t* __restrict__ low, const scalar_t* __restrict__ high,
                         const T* __restrict__ w_low,   // [9 * Cl, Co]
                         const T* __restrict__ w_high,  // [Ch, Co]
                         const T* __restrict__ bias, const T* __restrict__ gather, out_t* __restrict__ out,
                         int64_t first_item) {
  __shared__ T a_tile[kTileK][kTileM];
  __shared__ T b_tile[kTileK][kTileN];
  // per pixel and tap: the four bilinear source offsets into a low plane and their weights (0 outside);
  // the caller checks that a low plane's offsets fit 32 bits
  __shared__ int32_t tap_offset[9][4][kTileM];
  __shared__ T tap_weight[9][4][kTileM];
  __shared__ int64_t pixel_y[kTileM], pixel_x[kTileM];

  const int tid = threadIdx.x;
  const int64_t n = first_item + blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * kTileN;

  for (int m = tid; m < kTileM; m += kThreads) {
    const int64_t idx = m0 + m;
    int64_t y = -1, x = -1;
    if (idx < p.num_pixels) {
      if (p.border_only) {
        cff_border_pixel(idx, p.H, p.W, y, x);
      } else {
        y = idx / p.W;
        x = idx % p.W;
      }
    }
    pixel_y[m] = y;
    pixel_x[m] = x;
  }
  __syncthreads();
  if (p.taps) {
    for (int e = tid; e < 9 * kTileM; e += kThreads) {
      const int tap = e / kTileM, m = e % kTileM;
      const int64_t y = pixel_y[m] + cff_tap_offset(tap / 3, p.dilation);
      const int64_t x = pixel_x[m] + cff_tap_offset(tap % 3, p.dilation);
      const bool inside = pixel_y[m] >= 0 && y >= 0 && y < p.H && x >= 0 && x < p.W;
      if (!inside) {
        for (int q = 0; q < 4; ++q) {
          tap_offset[tap][q][m] = 0;
          tap_weight[tap][q][m] = T(0);
        }
        continue;
      }
      const LinearTaps<T> ty = resize_taps<T>(y, p.h, p.H, p.align_corners);
      const LinearTaps<T> tx = resize_taps<T>(x, p.w, p.W, p.align_corners);
      tap_offset[tap][0][m] = static_cast<int32_t>(ty.i0 * p.low.y + tx.i0 * p.low.x);
      tap_offset[tap][1][m] = static_cast<int32_t>(ty.i0 * p.low.y + tx.i1 * p.low.x);
      tap_offset[tap][2][m] = static_cast<int32_t>(ty.i1 * p.low.y + tx.i0 * p.low.x);
      tap_offset[tap][3][m] = static_cast<int32_t>(ty.i1 * p.low.y + tx.i1 * p.low.x);
      tap_weight[tap][0][m] = ty.w0 * tx.w0;
      tap_weight[tap][1][m] = ty.w0 * tx.w1;
      tap_weight[tap][2][m] = ty.w1 * tx.w0;
      tap_weight[tap][3][m] = ty.w1 * tx.w1;
    }
  }
  __syncthreads();

  const int64_t k_taps = p.taps ? 9 * p.Cl : 0;
  const int64_t k_total = k_taps + (p.proj ? p.Ch : 0);
  const scalar_t* low_n = low + n * p.low.n;
  const scalar_t* high_n = p.proj ? high + n * p.high.n : nullptr;
  const int tm = tid / (kTileN / kMicro);  // this thread's pixels: tm * 4 ...
  const int tn = tid % (kTileN / kMicro);  // this thread's channels: tn * 4 ...
  T acc[kMicro][kMicro] = {};

  for (int64_t k0 = 0; k0 < k_total; k0 += kTileK) {
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int kk = e / kTileM, m = e % kTileM;
      const int64_t k = k0 + kk;
      T v = T(0);
      if (k < k_total && pixel_y[m] >= 0) {
        if (k < k_taps) {
          const int tap = static_cast<int>(k / p.Cl);
          const scalar_t* plane = low_n + (k % p.Cl) * p.low.c;
#pragma unroll
          for (int q = 0; q < 4; ++q) v += tap_weight[tap][q][m] * static_cast<T>(plane[tap_offset[tap][q][m]]);
        } else {
          v = static_cast<T>(high_n[(k - k_taps) * p.high.c + pixel_y[m] * p.high.y + pixel_x[m] * p.high.x]);
        }
      }
      a_tile[kk][m] = v;
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = e / kTileN, j = e % kTileN;
      const int64_t k = k0 + kk, co = co0 + j;
      T v = T(0);
      if (k < k_total && co < p.Co) v = k < k_taps ? w_low[k * p.Co + co] : w_high[(k - k_taps) * p.Co + co];
      b_tile[kk][j] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      T a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        a[i] = a_tile[kk][tm * kMicro + i];
        b[i] = b_tile[kk][tn * kMicro + i];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int m = tm * kMicro + i;
    const int64_t y = pixel_y[m], x = pixel_x[m];
    if (y < 0) continue;
    if (p.skip_border && cff_shortcut_border(y, x, p.H, p.W)) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t co = co0 + tn * kMicro + j;
      if (co >= p.Co) continue;
      T v = acc[i][j];
      if (p.add_gather) {
        const LinearTaps<T> ty = resize_taps<T>(y, p.h, p.H, true);
        const LinearTaps<T> tx = resize_taps<T>(x, p.w, p.W, true);
        const T* g = gather + n * p.gather.n + co * p.gather.c;
        const auto at_g = [&](int64_t yy, int64_t xx) { return static_cast<T>(g[yy * p.gather.y + xx * p.gather.x]); };
        v += ty.w0 * (tx.w0 * at_g(ty.i0, tx.i0) + tx.w1 * at_g(ty.i0, tx.i1)) +
             ty.w1 * (tx.w0 * at_g(ty.i1, tx.i0) + tx.w1 * at_g(ty.i1, tx.i1));
      }
      if (p.epilogue) {
        v += bias[co];
        v = v < T(0) ? T(0) : v;  // ReLU that keeps NaN, as torch.relu does
      }
      out[n * p.out.n + co * p.out.c + y * p.out.y + x * p.out.x] = static_cast<out_t>(v);
    }
  }
}

template <typename scalar_t, typename T, typename out_t>
void launch(const CffLaunch& p, int64_t batch, const at::Tensor& low, const at::Tensor* high, const at::Tensor& w_low,
            const at::Tensor* w_high, const at::Tensor* bias, const at::Tensor* gather, at::Tensor& out,
            cudaStream_t stream) {
  // CUDA caps a grid's z dimension at 65535 blocks: a larger batch is launched in parts of that many items
  constexpr int64_t kMaxGridZ = 65535;
  for (int64_t first = 0; first < batch; first += kMaxGridZ) {
    const dim3 grid((p.num_pixels + kTileM - 1) / kTileM, (p.Co + kTileN - 1) / kTileN,
                    static_cast<unsigned>(std::min(kMaxGridZ, batch - first)));
    cff_implicit_gemm_kernel<scalar_t, T, out_t><<<grid, kThreads, 0, stream>>>(
        p, low.const_data_ptr<scalar_t>(), high ? high->const_data_ptr<scalar_t>() : nullptr,
        w_low.const_data_ptr<T>(), w_high ? w_high->const_data_ptr<T>() : nullptr,
        bias ? bias->const_data_ptr<T>() : nullptr, gather ? gather->const_data_ptr<T>() : nullptr,
        out.mutable_data_ptr<out_t>(), first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor cascade_feature_fusion_cuda(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                                       const at::Tensor& weight_high, const at::Tensor& bias, int64_t dilation,
                                       bool align_corners) {
  const CffShape s = make_cff_shape(low, high, weight_low, weight_high, bias, dilation, align_corners);
  if (cff_shortcut_dense_applies(low, s)) return cff_shortcut_dense_cuda(low, high, weight_low, weight_high, bias, s);
  TORCH_CHECK(low.stride(2) * (s.h - 1) + low.stride(3) * (s.w - 1) < std::numeric_limits<int32_t>::max(),
              "cascade_feature_fusion: low's planes are too large for 32-bit offsets");
  at::Tensor out = at::empty({s.N, s.Co, s.H, s.W}, high.options().memory_format(cff_output_format(high)));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(low.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, low.scalar_type(), "cascade_feature_fusion_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto opmath = low.options().dtype(c10::CppTypeToScalarType<T>::value);
    const at::Tensor w_low = weight_low.permute({2, 3, 1, 0}).reshape({9 * s.Cl, s.Co}).to(opmath).contiguous();
    const at::Tensor w_high = weight_high.t().to(opmath).contiguous();
    const at::Tensor b = bias.to(opmath).contiguous();
    CffLaunch p{s.Cl, s.h, s.w, s.Ch, s.H, s.W, s.Co, s.H * s.W, s.dilation, align_corners,
                /*taps=*/true, /*proj=*/true, /*add_gather=*/false, /*border_only=*/false, /*skip_border=*/false,
                /*epilogue=*/true, strides_of(low), strides_of(high), {}, strides_of(out)};
    if (!cff_exact_shortcut(s)) {
      launch<scalar_t, T, scalar_t>(p, s.N, low, &high, w_low, &w_high, &b, nullptr, out, stream);
      return;
    }
    // 1: the 3x3 conv at low resolution (no resize, dilation 1), kept in T
    at::Tensor conv_low = at::empty({s.N, s.Co, s.h, s.w}, opmath);
    CffLaunch low_res = p;
    low_res.H = s.h;
    low_res.W = s.w;
    low_res.num_pixels = s.h * s.w;
    low_res.dilation = 1;
    low_res.align_corners = true;
    low_res.proj = false;
    low_res.epilogue = false;
    low_res.out = strides_of(conv_low);
    launch<scalar_t, T, T>(low_res, s.N, low, nullptr, w_low, nullptr, nullptr, nullptr, conv_low, stream);
    // 2: projection + gather of the low-resolution conv + bias + ReLU, border pixels left out
    CffLaunch full = p;
    full.taps = false;
    full.add_gather = true;
    full.skip_border = true;
    full.gather = strides_of(conv_low);
    launch<scalar_t, T, scalar_t>(full, s.N, low, &high, w_low, &w_high, &b, &conv_low, out, stream);
    // 3: the border pixels, convolved directly
    CffLaunch border = p;
    border.border_only = true;
    border.num_pixels = cff_border_count(s.H, s.W);
    launch<scalar_t, T, scalar_t>(border, s.N, low, &high, w_low, &w_high, &b, nullptr, out, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icnet, CUDA, m) { m.impl("cascade_feature_fusion", &cascade_feature_fusion_cuda); }

}  // namespace icnet
