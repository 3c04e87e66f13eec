#pragma once
// Argument checking for pyramid_pool_sum, shared by every device's kernel.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "common/pyramid_geometry.h"

namespace icnet {

// Checks x and the pooling arguments and returns the geometry; errors name the offending argument.
PyramidGeometry make_pyramid_geometry(const at::Tensor& x, c10::IntArrayRef bins, c10::IntArrayRef kernel_sizes,
                                      c10::IntArrayRef strides, bool align_corners, const char* op);

}  // namespace icnet
