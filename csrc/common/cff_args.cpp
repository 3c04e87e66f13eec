#include "common/cff_args.h"

#include <limits>

namespace icnet {

CffShape make_cff_shape(const at::Tensor& low, const at::Tensor& high, const at::Tensor& weight_low,
                        const at::Tensor& weight_high, const at::Tensor& bias, int64_t dilation, bool align_corners) {
  constexpr const char* op = "cascade_feature_fusion";
  TORCH_CHECK_VALUE(low.dim() == 4, op, ": low must be a 4-D tensor [N, Cl, h, w], got ", low.dim(), " dimensions");
  TORCH_CHECK_VALUE(high.dim() == 4, op, ": high must be a 4-D tensor [N, Ch, H, W], got ", high.dim(), " dimensions");
  TORCH_CHECK_VALUE(at::isFloatingType(low.scalar_type()), op, ": low must be floating point, got ", low.scalar_type());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"high", &high}, {"weight_low", &weight_low}, {"weight_high", &weight_high}, {"bias", &bias}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->scalar_type() == low.scalar_type(), op, ": ", name, " must have low's dtype ", low.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == low.device(), op, ": ", name, " must be on low's device ", low.device(), ", got ",
                t->device());
  }
  CffShape s{};
  s.N = low.size(0);
  s.Cl = low.size(1);
  s.h = low.size(2);
  s.w = low.size(3);
  s.Ch = high.size(1);
  s.H = high.size(2);
  s.W = high.size(3);
  s.dilation = dilation;
  s.align_corners = align_corners;
  TORCH_CHECK_VALUE(high.size(0) == s.N, op, ": high's batch ", high.size(0), " must equal low's ", s.N);
  TORCH_CHECK_VALUE(s.Cl > 0 && s.Ch > 0, op, ": low and high need at least one channel, got ", s.Cl, " and ", s.Ch);
  TORCH_CHECK_VALUE(s.h > 0 && s.w > 0, op, ": low must have a non-empty spatial size, got ", s.h, "x", s.w);
  TORCH_CHECK_VALUE(s.H >= s.h && s.W >= s.w, op, ": high (", s.H, "x", s.W, ") must be at least as large as low (", s.h,
              "x", s.w, ")");
  TORCH_CHECK_VALUE(dilation >= 1 && dilation <= std::numeric_limits<int32_t>::max(), op,
                    ": dilation must be in [1, 2^31 - 1], got ", dilation);
  TORCH_CHECK_VALUE(weight_low.dim() == 4 && weight_low.size(1) == s.Cl && weight_low.size(2) == 3 && weight_low.size(3) == 3,
              op, ": weight_low must be [Co, ", s.Cl, ", 3, 3] (Cl = low's channels), got ", weight_low.sizes());
  s.Co = weight_low.size(0);
  TORCH_CHECK_VALUE(s.Co > 0, op, ": weight_low must have at least one output channel");
  TORCH_CHECK_VALUE(weight_high.dim() == 2 && weight_high.size(0) == s.Co && weight_high.size(1) == s.Ch, op,
              ": weight_high must be [", s.Co, ", ", s.Ch, "] (Co of weight_low, Ch = high's channels), got ",
              weight_high.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == s.Co, op, ": bias must be [", s.Co, "], got ", bias.sizes());
  return s;
}

}  // namespace icnet
