#pragma once
// Element strides of a 4-D tensor, passed by value to CUDA kernels that index NCHW and channels_last alike.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace icnet {

struct Strides {
  int64_t n, c, y, x;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

}  // namespace icnet
