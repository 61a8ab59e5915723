#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// Matches Hugging Face's rotate-half RoPE: inv_freq = theta^(-2i/D) in fp32, angle = pos * inv_freq
// in fp32, x' = x * cos + rotate_half(x) * sin with pairs (i, i + D/2).
void rope(Tensor& qkv, const Tensor& positions, const RopeParams& p) {
  const int64_t T = qkv.dim(0), D = p.head_dim, half = D / 2;
  const int64_t row = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * D;
  QUILT_ASSERT(qkv.dim(1) == row && positions.numel() == T && D % 2 == 0);
  std::vector<float> inv_freq(half), cos_t(half), sin_t(half);
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(D);
    inv_freq[i] = 1.0f / std::pow(p.theta, expo);
  }
  const int32_t* pos = positions.as<int32_t>();
  const int heads = p.num_q_heads + p.num_kv_heads;  // q heads then k heads are contiguous
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[t]) * inv_freq[i];
      cos_t[i] = std::cos(angle);
      sin_t[i] = std::sin(angle);
    }
    float* base = qkv.as<float>() + t * row;
    for (int h = 0; h < heads; ++h) {
      float* x = base + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos_t[i] - b * sin_t[i];
        x[i + half] = b * cos_t[i] + a * sin_t[i];
      }
    }
  }
}

}  // namespace quilt::cpu
