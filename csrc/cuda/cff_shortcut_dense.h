#pragma once
// The exact CFF shortcut for float16 and bfloat16 on CUDA through cuDNN convolutions
// (cuda/cff_shortcut_dense.cu).
#include <ATen/core/Tensor.h>

#include "common/cff_geometry.h"

namespace icnet {

// Whether cff_shortcut_dense_cuda computes this call: the exact shortcut's geometry in a 16-bit dtype.
bool cff_shortcut_dense_applies(const at::Tensor& low, const CffShape& s);

// The op's result for arguments already checked by make_cff_shape (weights BN-folded, low's dtype).
at::Tensor cff_shortcut_dense_cuda(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                                   const at::Tensor& weight_high, const at::Tensor& bias, const CffShape& s);

}  // namespace icnet
