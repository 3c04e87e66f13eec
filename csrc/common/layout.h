#pragma once
// The memory format the ops give their outputs, the twin of icnet_kernels.cff_geometry.memory_format_of.
#include <ATen/core/Tensor.h>

namespace icnet {

// channels_last for a channels_last tensor that is not also plainly contiguous, else NCHW.
inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

}  // namespace icnet
