#pragma once
// Rows of float results stored in a kernel's output dtype, written so that the loops vectorise.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace icnet {

// dst[i] = src[i] rounded to scalar_t. From float to bfloat16 the rounding (to nearest even, NaN kept quiet) is
// spelled out in integer arithmetic: c10::BFloat16's constructor computes the same bits but with a branch
// per element, which keeps the compiler from vectorising the loop.
template <typename src_t, typename scalar_t>
inline void store_row(const src_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    auto* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, src + i, sizeof(bits));
      const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
      out[i] = src[i] != src[i] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace icnet
