// Summed pyramid pooling on CUDA. A small kernel fills the stacked 1-D reduce/expand matrices of
// common/pyramid_geometry.h once per geometry, device and dtype (kept for later calls); then one block per (n, c) plane reads the plane once (into
// shared memory when it fits, which is ICNet's case), reduces it to every bin's pooled grid, and writes it
// once with the resized bins added. Forward and backward differ only in which matrices reduce and expand.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "common/pyramid_args.h"

namespace icnet {
namespace {

constexpr int kThreads = 256;
constexpr int kTableThreads = 128;
// The four stacked matrices, each [rows, length of its axis].
enum Matrix { kReduceH = 0, kReduceW = 1, kExpandH = 2, kExpandW = 3, kNumMatrices = 4 };

struct TableLayout {
  int64_t offset[kNumMatrices];  // element offset of each matrix in the table buffer
  int64_t total;
  __host__ __device__ int64_t length(const PyramidGeometry& g, int m) const { return g.length[m % 2]; }
};

TableLayout make_layout(const PyramidGeometry& g) {
  TableLayout t{};
  int64_t at = 0;
  for (int m = 0; m < kNumMatrices; ++m) {
    t.offset[m] = at;
    at += g.rows * g.length[m % 2];
  }
  t.total = at;
  return t;
}

// grid (rows, 4): one block per matrix row; also records the row's nonzero band [lo, hi) in bands.
template <typename T>
__global__ void fill_pyramid_tables_kernel(PyramidGeometry g, PyramidDirection dir, TableLayout layout, T* tables,
                                           int* bands) {
  const int row = blockIdx.x;
  const int m = blockIdx.y;
  const int axis = m % 2;
  const int64_t len = g.length[axis];
  __shared__ int lo, hi;
  if (threadIdx.x == 0) {
    lo = static_cast<int>(len);
    hi = 0;
  }
  __syncthreads();
  T* out = tables + layout.offset[m] + row * len;
  for (int64_t p = threadIdx.x; p < len; p += blockDim.x) {
    const T w = m < kExpandH ? reduce_weight<T>(g, dir, axis, row, p) : expand_weight<T>(g, dir, axis, row, p);
    out[p] = w;
    if (w != T(0)) {
      atomicMin(&lo, static_cast<int>(p));
      atomicMax(&hi, static_cast<int>(p + 1));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bands[(m * g.rows + row) * 2] = lo;
    bands[(m * g.rows + row) * 2 + 1] = hi;
  }
}

struct PlaneStrides {
  int64_t n, c, h, w;
};

// Dynamic shared memory: [plane H*W if kPlaneInShared] [reduced_w H*rows] [expanded_h H*rows] [pooled rows*rows]
template <bool kPlaneInShared, typename T>
int64_t shared_bytes(const PyramidGeometry& g) {
  const int64_t H = g.length[0], W = g.length[1];
  return static_cast<int64_t>(sizeof(T)) * ((kPlaneInShared ? H * W : 0) + 2 * H * g.rows + g.rows * g.rows);
}

template <typename scalar_t, typename T, bool kPlaneInShared>
__global__ void __launch_bounds__(kThreads)
pyramid_pool_sum_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, PyramidGeometry g, int64_t C,
                        PlaneStrides in_stride, PlaneStrides out_stride, TableLayout layout,
                        const T* __restrict__ tables, const int* __restrict__ bands) {
  extern __shared__ unsigned char shared_raw[];
  T* shared = reinterpret_cast<T*>(shared_raw);
  const int64_t H = g.length[0], W = g.length[1];
  const int rows = g.rows;
  const int64_t plane_id = blockIdx.x;
  const int64_t n = plane_id / C, c = plane_id % C;
  const scalar_t* x = in + n * in_stride.n + c * in_stride.c;
  scalar_t* y = out + n * out_stride.n + c * out_stride.c;

  T* plane = shared;
  T* reduced_w = shared + (kPlaneInShared ? H * W : 0);
  T* expanded_h = reduced_w + H * rows;
  T* pooled = expanded_h + H * rows;
  const auto value = [&](int64_t h, int64_t w) -> T {
    if constexpr (kPlaneInShared) {
      return plane[h * W + w];
    } else {
      return static_cast<T>(x[h * in_stride.h + w * in_stride.w]);
    }
  };
  const auto band = [&](int m, int row, int end) { return bands[(m * rows + row) * 2 + end]; };
  const T* reduce_h = tables + layout.offset[kReduceH];
  const T* reduce_w = tables + layout.offset[kReduceW];
  const T* expand_h = tables + layout.offset[kExpandH];
  const T* expand_w = tables + layout.offset[kExpandW];

  if constexpr (kPlaneInShared) {
    for (int64_t e = threadIdx.x; e < H * W; e += blockDim.x) {
      const int64_t h = e / W, w = e % W;
      plane[e] = static_cast<T>(x[h * in_stride.h + w * in_stride.w]);
    }
    __syncthreads();
  }
  // reduced_w[h, j] = sum_w x[h, w] * reduce_w[j, w]
  for (int64_t e = threadIdx.x; e < H * rows; e += blockDim.x) {
    const int64_t h = e / rows;
    const int j = static_cast<int>(e % rows);
    T acc = T(0);
    for (int64_t w = band(kReduceW, j, 0); w < band(kReduceW, j, 1); ++w) acc += value(h, w) * reduce_w[j * W + w];
    reduced_w[e] = acc;
  }
  __syncthreads();
  // pooled[i, j] = sum_h reduce_h[i, h] * reduced_w[h, j] for i, j of one bin (other entries unused)
  for (int e = threadIdx.x; e < rows * rows; e += blockDim.x) {
    const int i = e / rows, j = e % rows;
    if (bin_of_row(g, i) != bin_of_row(g, j)) continue;
    T acc = T(0);
    for (int64_t h = band(kReduceH, i, 0); h < band(kReduceH, i, 1); ++h) acc += reduce_h[i * H + h] * reduced_w[h * rows + j];
    pooled[e] = acc;
  }
  __syncthreads();
  // expanded_h[h, j] = sum_i expand_h[i, h] * pooled[i, j], i over j's bin
  for (int64_t e = threadIdx.x; e < H * rows; e += blockDim.x) {
    const int64_t h = e / rows;
    const int j = static_cast<int>(e % rows);
    const int b = bin_of_row(g, j);
    T acc = T(0);
    for (int i = g.row_offset[b]; i < g.row_offset[b + 1]; ++i) acc += expand_h[i * H + h] * pooled[i * rows + j];
    expanded_h[e] = acc;
  }
  __syncthreads();
  // out[h, w] = x[h, w] + sum_j expanded_h[h, j] * expand_w[j, w]
  for (int64_t e = threadIdx.x; e < H * W; e += blockDim.x) {
    const int64_t h = e / W, w = e % W;
    T acc = value(h, w);
    for (int j = 0; j < rows; ++j) {
      if (w >= band(kExpandW, j, 0) && w < band(kExpandW, j, 1)) acc += expanded_h[h * rows + j] * expand_w[j * W + w];
    }
    y[h * out_stride.h + w * out_stride.w] = static_cast<scalar_t>(acc);
  }
}

template <bool kPlaneInShared, typename scalar_t, typename T>
void launch_planes(const at::Tensor& in, at::Tensor& out, const PyramidGeometry& g, const TableLayout& layout,
                   const at::Tensor& tables, const at::Tensor& bands, int64_t smem, cudaStream_t stream) {
  auto kernel = pyramid_pool_sum_kernel<scalar_t, T, kPlaneInShared>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const PlaneStrides in_stride{in.stride(0), in.stride(1), in.stride(2), in.stride(3)};
  const PlaneStrides out_stride{out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  kernel<<<in.size(0) * in.size(1), kThreads, smem, stream>>>(
      in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, in.size(1), in_stride, out_stride, layout,
      tables.const_data_ptr<T>(), bands.const_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The filled tables of one geometry, direction, device and dtype.
struct PyramidTables {
  at::Tensor tables, bands;
};

std::vector<int64_t> tables_key(const PyramidGeometry& g, PyramidDirection dir, const at::Tensor& in) {
  std::vector<int64_t> key{static_cast<int64_t>(dir), in.get_device(), static_cast<int64_t>(in.scalar_type()),
                           g.num_bins, g.adaptive, g.align_corners, g.length[0], g.length[1]};
  for (int b = 0; b < g.num_bins; ++b)
    key.insert(key.end(), {g.bins[b], g.kernel[0][b], g.kernel[1][b], g.stride[0][b], g.stride[1][b]});
  return key;
}

// Tables are filled by a kernel on the current stream the first time a geometry is seen and kept, so a
// later call (and a CUDA graph captured after a first call) launches the pyramid kernel alone. A first
// call inside a graph capture fills tables for that call only: memory allocated during a capture belongs
// to the graph.
template <typename T>
PyramidTables pyramid_tables(const at::Tensor& in, const PyramidGeometry& g, PyramidDirection dir,
                             const TableLayout& layout, cudaStream_t stream) {
  static std::mutex mutex;
  // never destroyed: tensors freed after the CUDA context has gone at exit would fail
  static auto* kept = new std::map<std::vector<int64_t>, PyramidTables>();
  const std::vector<int64_t> key = tables_key(g, dir, in);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = kept->find(key); found != kept->end()) return found->second;
  PyramidTables t{at::empty({layout.total}, in.options().dtype(c10::CppTypeToScalarType<T>::value)),
                  at::empty({kNumMatrices * g.rows * 2}, in.options().dtype(at::kInt))};
  fill_pyramid_tables_kernel<T><<<dim3(g.rows, kNumMatrices), kTableThreads, 0, stream>>>(
      g, dir, layout, t.tables.mutable_data_ptr<T>(), t.bands.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (capture == cudaStreamCaptureStatusNone) {
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // once per geometry: later calls may run on other streams
    kept->emplace(key, t);
  }
  return t;
}

at::Tensor pyramid_apply_cuda(const at::Tensor& in, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                              c10::IntArrayRef strides, bool align_corners, PyramidDirection dir, const char* op) {
  const PyramidGeometry g = make_pyramid_geometry(in, bins, kernel_sizes, strides, align_corners, op);
  TORCH_CHECK(in.size(0) * in.size(1) <= std::numeric_limits<int32_t>::max(), op,
              ": N*C = ", in.size(0) * in.size(1), " planes exceed the CUDA grid");
  at::Tensor out = at::empty_like(in);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, in.get_device()));
  const TableLayout layout = make_layout(g);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "pyramid_pool_sum_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const PyramidTables kept = pyramid_tables<T>(in, g, dir, layout, stream);
    const at::Tensor& tables = kept.tables;
    const at::Tensor& bands = kept.bands;
    const int64_t smem_plane = shared_bytes<true, T>(g);
    const int64_t smem_streamed = shared_bytes<false, T>(g);
    if (smem_plane <= max_smem) {
      launch_planes<true, scalar_t, T>(in, out, g, layout, tables, bands, smem_plane, stream);
    } else {
      TORCH_CHECK(smem_streamed <= max_smem, op, ": a ", g.length[0], "x", g.length[1],
                  " map is too tall for the CUDA kernel's shared memory; use backend='triton'");
      launch_planes<false, scalar_t, T>(in, out, g, layout, tables, bands, smem_streamed, stream);
    }
  });
  return out;
}

}  // namespace

at::Tensor pyramid_pool_sum_cuda(const at::Tensor& x, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                                 c10::IntArrayRef strides, bool align_corners) {
  return pyramid_apply_cuda(x, bins, kernel_sizes, strides, align_corners, PyramidDirection::kForward,
                            "pyramid_pool_sum");
}

at::Tensor pyramid_pool_sum_backward_cuda(const at::Tensor& grad_out, c10::IntArrayRef bins,
                                          c10::IntArrayRef kernel_sizes, c10::IntArrayRef strides,
                                          bool align_corners) {
  return pyramid_apply_cuda(grad_out, bins, kernel_sizes, strides, align_corners, PyramidDirection::kAdjoint,
                            "pyramid_pool_sum_backward");
}

TORCH_LIBRARY_IMPL(icnet, CUDA, m) {
  m.impl("pyramid_pool_sum", &pyramid_pool_sum_cuda);
  m.impl("pyramid_pool_sum_backward", &pyramid_pool_sum_backward_cuda);
}

}  // namespace icnet
