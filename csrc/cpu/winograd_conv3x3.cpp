#include "cpu/winograd_conv3x3.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace icnet {
namespace {

constexpr int64_t kTerms = 16;  // transformed terms of a tile: its 4x4 input window

// Channel pairs per block of the weight transform: its 16 terms are staged in a small buffer and written
// as 16 runs of this many floats. Writing each pair's 16 terms straight to memory would touch 16 places
// Co * C floats apart, all in the same cache set when that distance is a power of two.
constexpr int64_t kPairsPerBlock = 64;

// U = G g G^T for every (output, input) channel pair, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
// [0, 0, 1]]: [16 * Co, C, 1, 1], the weight of the grouped 1x1 convolution, group t holding term t.
at::Tensor transform_weight(const at::Tensor& weight) {
  RECORD_FUNCTION("icnet::winograd_weight_transform", {});
  const at::Tensor g = weight.contiguous();
  const int64_t pairs = g.size(0) * g.size(1);
  at::Tensor u = at::empty({kTerms * g.size(0), g.size(1), 1, 1}, g.options());
  const float* src = g.const_data_ptr<float>();
  float* dst = u.mutable_data_ptr<float>();
  const int64_t blocks = (pairs + kPairsPerBlock - 1) / kPairsPerBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float staged[kTerms][kPairsPerBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t p0 = block * kPairsPerBlock, count = std::min(kPairsPerBlock, pairs - p0);
      for (int64_t q = 0; q < count; ++q) {
        const float* k = src + (p0 + q) * 9;
        float a[4][3];  // G g, along ky
        for (int kx = 0; kx < 3; ++kx) {
          const float g0 = k[kx], g1 = k[3 + kx], g2 = k[6 + kx];
          a[0][kx] = g0;
          a[1][kx] = 0.5f * (g0 + g1 + g2);
          a[2][kx] = 0.5f * (g0 - g1 + g2);
          a[3][kx] = g2;
        }
        for (int i = 0; i < 4; ++i) {  // (G g) G^T, along kx
          const float g0 = a[i][0], g1 = a[i][1], g2 = a[i][2];
          staged[i * 4 + 0][q] = g0;
          staged[i * 4 + 1][q] = 0.5f * (g0 + g1 + g2);
          staged[i * 4 + 2][q] = 0.5f * (g0 - g1 + g2);
          staged[i * 4 + 3][q] = g2;
        }
      }
      for (int64_t t = 0; t < kTerms; ++t) std::copy_n(staged[t], count, dst + t * pairs + p0);
    }
  });
  return u;
}

// Channels per block of the two layout-changing transforms: one cache line, and one AVX-512 register, of
// float32. A block's rows are staged channel-innermost in a small buffer, so that the transform vectorises
// over channels and both the image rows and the transformed terms are read and written contiguously.
constexpr int64_t kChannelBlock = 16;

// V = B^T d B for every tile and channel, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
// d the tile's 4x4 window with its top-left at (2 ty - 1, 2 tx - 1), zero outside the map (the padding):
// a channels-last [N, 16 * C, th, tw] tensor, term-major channels, from input of any strides.
at::Tensor transform_input(const at::Tensor& input, int64_t th, int64_t tw) {
  RECORD_FUNCTION("icnet::winograd_input_transform", {});
  const int64_t batch = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t sn = input.stride(0), sc = input.stride(1), sy = input.stride(2), sx = input.stride(3);
  at::Tensor v = at::empty({batch, kTerms * c, th, tw}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* src = input.const_data_ptr<float>();
  float* dst = v.mutable_data_ptr<float>();
  const int64_t columns = 2 * tw + 2;  // the windows of a tile row span x = -1 .. 2 tw
  const int64_t blocks = (c + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, batch * th, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(4 * columns * kChannelBlock);  // [4][columns][kChannelBlock], zero outside the map
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / th, ty = task % th;
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t c0 = block * kChannelBlock, count = std::min(kChannelBlock, c - c0);
        std::fill(rows.begin(), rows.end(), 0.f);
        for (int64_t k = 0; k < count; ++k)
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t y = 2 * ty - 1 + i;
            if (y < 0 || y >= h) continue;
            const float* row = src + n * sn + (c0 + k) * sc + y * sy;
            float* staged = rows.data() + (i * columns + 1) * kChannelBlock + k;
            for (int64_t x = 0; x < w; ++x) staged[x * kChannelBlock] = row[x * sx];
          }
        for (int64_t tx = 0; tx < tw; ++tx) {
          const float* d = rows.data() + 2 * tx * kChannelBlock;  // window (i, j) at (i * columns + j) * block
          float* out = dst + ((n * th + ty) * tw + tx) * kTerms * c + c0;
#pragma omp simd
          for (int64_t k = 0; k < count; ++k) {
            float t[4][4];  // B^T d, along y
            for (int64_t j = 0; j < 4; ++j) {
              const float d0 = d[(0 * columns + j) * kChannelBlock + k], d1 = d[(1 * columns + j) * kChannelBlock + k];
              const float d2 = d[(2 * columns + j) * kChannelBlock + k], d3 = d[(3 * columns + j) * kChannelBlock + k];
              t[0][j] = d0 - d2;
              t[1][j] = d1 + d2;
              t[2][j] = d2 - d1;
              t[3][j] = d1 - d3;
            }
            for (int64_t i = 0; i < 4; ++i) {  // (B^T d) B, along x
              out[(i * 4 + 0) * c + k] = t[i][0] - t[i][2];
              out[(i * 4 + 1) * c + k] = t[i][1] + t[i][2];
              out[(i * 4 + 2) * c + k] = t[i][2] - t[i][1];
              out[(i * 4 + 3) * c + k] = t[i][1] - t[i][3];
            }
          }
        }
      }
    }
  });
  return v;
}

// Y = A^T M A for every tile and output channel, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], M the grouped
// convolution's channels-last [N, 16 * Co, th, tw] result: a contiguous [N, Co, h, w] tensor. A tile's row
// or column past the map's end (h or w odd) is computed and not written.
at::Tensor transform_output(const at::Tensor& products, int64_t co, int64_t h, int64_t w) {
  RECORD_FUNCTION("icnet::winograd_output_transform", {});
  const at::Tensor m = products.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t batch = m.size(0), th = m.size(2), tw = m.size(3);
  at::Tensor y = at::empty({batch, co, h, w}, m.options().memory_format(at::MemoryFormat::Contiguous));
  const float* src = m.const_data_ptr<float>();
  float* dst = y.mutable_data_ptr<float>();
  const int64_t columns = 2 * tw;
  const int64_t blocks = (co + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, batch * th, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(2 * columns * kChannelBlock);  // [2][columns][kChannelBlock]: a tile row's output
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / th, ty = task % th;
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t c0 = block * kChannelBlock, count = std::min(kChannelBlock, co - c0);
        for (int64_t tx = 0; tx < tw; ++tx) {
          const float* s = src + ((n * th + ty) * tw + tx) * kTerms * co + c0;
          float* o = rows.data() + 2 * tx * kChannelBlock;  // output (a, b) at (a * columns + b) * block
#pragma omp simd
          for (int64_t k = 0; k < count; ++k) {
            float r[2][4];  // A^T M, along y
            for (int64_t j = 0; j < 4; ++j) {
              const float m0 = s[(0 + j) * co + k], m1 = s[(4 + j) * co + k];
              const float m2 = s[(8 + j) * co + k], m3 = s[(12 + j) * co + k];
              r[0][j] = m0 + m1 + m2;
              r[1][j] = m1 - m2 - m3;
            }
            for (int64_t a = 0; a < 2; ++a) {  // (A^T M) A, along x
              o[(a * columns + 0) * kChannelBlock + k] = r[a][0] + r[a][1] + r[a][2];
              o[(a * columns + 1) * kChannelBlock + k] = r[a][1] - r[a][2] - r[a][3];
            }
          }
        }
        for (int64_t k = 0; k < count; ++k)
          for (int64_t a = 0; a < 2 && 2 * ty + a < h; ++a) {
            float* row = dst + ((n * co + c0 + k) * h + 2 * ty + a) * w;
            const float* staged = rows.data() + a * columns * kChannelBlock + k;
            for (int64_t x = 0; x < w; ++x) row[x] = staged[x * kChannelBlock];
          }
      }
    }
  });
  return y;
}

}  // namespace

at::Tensor conv3x3_winograd_f2(const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 4, "_conv3x3_winograd: input must be [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1) && weight.size(2) == 3 && weight.size(3) == 3,
              "_conv3x3_winograd: weight must be [Co, ", input.size(1), ", 3, 3], got ", weight.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "_conv3x3_winograd: input and weight must be float32, got ", input.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "_conv3x3_winograd: input and weight must be on the CPU");
  if (input.numel() == 0 || weight.size(0) == 0)
    return at::zeros({input.size(0), weight.size(0), input.size(2), input.size(3)}, input.options());
  const int64_t h = input.size(2), w = input.size(3);
  const at::Tensor products = at::conv2d(transform_input(input, (h + 1) / 2, (w + 1) / 2), transform_weight(weight),
                                         std::nullopt, at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                                         at::IntArrayRef{1, 1}, kTerms);
  return transform_output(products, weight.size(0), h, w);
}

bool winograd_f2_pays(const at::Tensor& input, int64_t out_channels) {
  constexpr int64_t kCachedBytes = int64_t{16} << 20;
  const int64_t tiles = input.size(0) * ((input.size(2) + 1) / 2) * ((input.size(3) + 1) / 2);
  return tiles * kTerms * (input.size(1) + out_channels) * int64_t{sizeof(float)} <= kCachedBytes;
}

TORCH_LIBRARY_IMPL(icnet, CPU, m) { m.impl("_conv3x3_winograd", &conv3x3_winograd_f2); }

}  // namespace icnet
