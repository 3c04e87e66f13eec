#pragma once
// Argument checking for segmentation_head and segmentation_head_labels, the twin of
// icnet_kernels.ops.segmentation_head.check_segmentation_head_args (same order, same messages).
#include <ATen/core/Tensor.h>

namespace icnet {

constexpr int64_t kMaxHeadZoom = 64;
constexpr int64_t kMaxLabelClasses = 256;  // labels are uint8

// The output's spatial size: (h-1)*zoom+1 by (w-1)*zoom+1.
inline std::pair<int64_t, int64_t> zoomed_size(const at::Tensor& features, int64_t zoom) {
  return {(features.size(2) - 1) * zoom + 1, (features.size(3) - 1) * zoom + 1};
}

// features [N, K, h, w] floating point, weight [C, K] and bias [C] in its dtype and on its device, zoom in
// [1, kMaxHeadZoom]; with labels at most kMaxLabelClasses classes. Errors name the argument.
void check_segmentation_head_args(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                                  int64_t zoom, bool labels);

}  // namespace icnet
