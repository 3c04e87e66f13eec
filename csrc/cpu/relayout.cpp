// NCHW <-> channels_last on the CPU by a cache-blocked transpose of each image's [C, H*W] matrix.
//
// ATen's copy between the two layouts walks the destination in order and reads the source at the channel
// stride, so every read of a wide map misses the cache; a tile of kTile x kTile elements is read and
// written in whole cache lines instead. The op only moves bytes, so it dispatches on the element size.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/relayout.h"

#include <algorithm>
#include <cstdint>

namespace icnet {
namespace {

constexpr int64_t kTile = 32;

// dst[n][c][r] = src[n][r][c] for src [batch, rows, cols] and dst [batch, cols, rows], both contiguous.
template <typename T>
void transpose_batched(const T* src, T* dst, int64_t batch, int64_t rows, int64_t cols) {
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  const int64_t tiles = row_tiles * col_tiles;
  at::parallel_for(0, batch * tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, tile = task % tiles;
      const int64_t r0 = tile / col_tiles * kTile, c0 = tile % col_tiles * kTile;
      const int64_t r1 = std::min(r0 + kTile, rows), c1 = std::min(c0 + kTile, cols);
      const T* s = src + n * rows * cols;
      T* d = dst + n * rows * cols;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) d[c * rows + r] = s[r * cols + c];
      }
    }
  });
}

template <typename T>
void transpose_images(const at::Tensor& x, at::Tensor& out, bool to_channels_last) {
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  const T* src = static_cast<const T*>(x.const_data_ptr());
  T* dst = static_cast<T*>(out.mutable_data_ptr());
  if (to_channels_last) {
    transpose_batched(src, dst, n, c, pixels);  // [C, HW] -> [HW, C]
  } else {
    transpose_batched(src, dst, n, pixels, c);  // [HW, C] -> [C, HW]
  }
}

}  // namespace

at::Tensor relayout_cpu(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK_VALUE(x.dim() == 4, "_relayout: x must be a 4-D tensor [N, C, H, W], got ", x.dim(), " dimensions");
  const at::MemoryFormat target = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::MemoryFormat source = channels_last ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK_VALUE(x.is_contiguous(source), "_relayout: x must be contiguous in ",
                    channels_last ? "NCHW" : "channels_last", " to be laid out ", channels_last ? "channels_last" : "NCHW");
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(target));
  if (out.numel() == 0) return out;
  switch (x.element_size()) {
    case 1: transpose_images<uint8_t>(x, out, channels_last); break;
    case 2: transpose_images<uint16_t>(x, out, channels_last); break;
    case 4: transpose_images<uint32_t>(x, out, channels_last); break;
    case 8: transpose_images<uint64_t>(x, out, channels_last); break;
    default: TORCH_CHECK_VALUE(false, "_relayout: x has elements of ", x.element_size(), " bytes; 1, 2, 4 or 8 are laid out");
  }
  return out;
}

TORCH_LIBRARY_IMPL(icnet, CPU, m) { m.impl("_relayout", &relayout_cpu); }

}  // namespace icnet
