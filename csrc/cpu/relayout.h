#pragma once
// NCHW <-> channels_last by a cache-blocked transpose (relayout.cpp), for the CPU kernels and icnet::_relayout.
#include <ATen/core/Tensor.h>

namespace icnet {

// A copy of x, which is contiguous in one of NCHW and channels_last, in the other (channels_last: the target).
at::Tensor relayout_cpu(const at::Tensor& x, bool channels_last);

}  // namespace icnet
