#include "common/cff_border.h"

#include <ATen/ops/conv2d.h>
#include <ATen/ops/upsample_linear1d.h>

#include <optional>

namespace icnet {

ShortcutBorder shortcut_border(const at::Tensor& low, const at::Tensor& weight, const CffShape& s) {
  // The 1-D convs run as 2-D ones over a single row or column (oneDNN on the CPU, cuDNN on a GPU).
  const auto row_term = [&](int64_t row, int64_t tap) {
    const at::Tensor up_x = at::upsample_linear1d(low.select(2, row), {s.W}, true).unsqueeze(2);
    return at::conv2d(up_x, weight.select(2, tap).unsqueeze(2), std::nullopt, at::IntArrayRef{1, 1},
                      at::IntArrayRef{0, 2}, at::IntArrayRef{1, 2})
        .squeeze(2)
        .mul_(-0.5);
  };
  const auto col_term = [&](int64_t col, int64_t tap) {
    const at::Tensor at_low = at::conv2d(low.select(3, col).unsqueeze(3), weight.select(3, tap).unsqueeze(3),
                                         std::nullopt, at::IntArrayRef{1, 1}, at::IntArrayRef{1, 0});
    return at::upsample_linear1d(at_low.squeeze(3), {s.H}, true).mul_(-0.5);
  };
  return {row_term(0, 0).contiguous(), row_term(s.h - 1, 2).contiguous(), col_term(0, 0).contiguous(),
          col_term(s.w - 1, 2).contiguous()};
}

}  // namespace icnet
