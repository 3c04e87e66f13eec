#include "common/segmentation_head_args.h"

#include <limits>

namespace icnet {

void check_segmentation_head_args(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& bias,
                                  int64_t zoom, bool labels) {
  const char* op = labels ? "segmentation_head_labels" : "segmentation_head";
  TORCH_CHECK_VALUE(features.dim() == 4, op, ": features must be a 4-D tensor [N, K, h, w], got ", features.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(at::isFloatingType(features.scalar_type()), op, ": features must be floating point, got ",
                    features.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"weight", weight}, {"bias", bias}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == features.scalar_type(), op, ": ", name, " must have features' dtype ",
                      features.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == features.device(), op, ": ", name, " must be on features' device ",
                      features.device(), ", got ", t.device());
  }
  const int64_t k = features.size(1), h = features.size(2), w = features.size(3);
  TORCH_CHECK_VALUE(k > 0, op, ": features need at least one channel");
  TORCH_CHECK_VALUE(h > 0 && w > 0, op, ": features must have a non-empty spatial size, got ", h, "x", w);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == k, op, ": weight must be [C, ", k,
                    "] (K = features' channels), got ", weight.sizes());
  const int64_t c = weight.size(0);
  TORCH_CHECK_VALUE(c > 0, op, ": weight must have at least one class");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == c, op, ": bias must be [", c, "], got ", bias.sizes());
  TORCH_CHECK_VALUE(zoom >= 1 && zoom <= kMaxHeadZoom, op, ": zoom must be in [1, ", kMaxHeadZoom, "], got ", zoom);
  const auto [height, width] = zoomed_size(features, zoom);
  TORCH_CHECK_VALUE(height * width <= std::numeric_limits<int32_t>::max(), op, ": the zoomed size ", height, "x",
                    width, " is too large");
  if (labels) {
    TORCH_CHECK_VALUE(c <= kMaxLabelClasses, op, ": labels are uint8, so weight may have at most ", kMaxLabelClasses,
                      " classes, got ", c);
  }
}

}  // namespace icnet
