#pragma once
// Argument checking for cascade_feature_fusion, shared by every device's kernel.
#include <ATen/core/Tensor.h>

#include "common/cff_geometry.h"
#include "common/layout.h"

namespace icnet {

// Checks the op's arguments and returns its shape; errors name the offending argument.
CffShape make_cff_shape(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                        const at::Tensor& weight_high, const at::Tensor& bias, int64_t dilation, bool align_corners);

// The output's layout: channels_last when high is channels_last (and not also plainly contiguous), else NCHW.
inline at::MemoryFormat cff_output_format(const at::Tensor& high) { return memory_format_of(high); }

}  // namespace icnet
