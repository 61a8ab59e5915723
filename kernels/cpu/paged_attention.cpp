#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

void paged_attention(Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                     const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables,
                     const AttentionParams& p) {
  const int64_t D = p.head_dim, Hq = p.num_q_heads, Hkv = p.num_kv_heads;
  const int64_t row = (Hq + 2 * Hkv) * D;
  const int64_t S = seqlens.numel();
  QUILT_ASSERT(Hq % Hkv == 0 && cu_seqlens.numel() == S + 1 && qkv.dim(1) == row);
  QUILT_ASSERT(out.dim(0) == qkv.dim(0) && out.dim(1) == Hq * D);
  const int64_t group = Hq / Hkv;
  const int64_t num_slots = k_cache.dim(0);
  const int32_t* cu = cu_seqlens.as<int32_t>();
  const int32_t* lens = seqlens.as<int32_t>();
  const int32_t* tables = block_tables.as<int32_t>();
  const float* kc = k_cache.as<float>();
  const float* vc = v_cache.as<float>();
  std::vector<float> scores;
  std::vector<int64_t> slot_of;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_begin = cu[s], q_len = cu[s + 1] - cu[s], ctx = lens[s];
    QUILT_ASSERT(q_len >= 0 && q_len <= ctx, "sequence ", s, ": ", q_len, " query tokens for a context of ", ctx);
    QUILT_ASSERT((ctx + p.block_size - 1) / p.block_size <= p.max_blocks_per_seq);
    slot_of.resize(ctx);
    for (int64_t j = 0; j < ctx; ++j) {
      const int32_t block = tables[s * p.max_blocks_per_seq + j / p.block_size];
      slot_of[j] = static_cast<int64_t>(block) * p.block_size + j % p.block_size;
      QUILT_ASSERT(block >= 0 && slot_of[j] < num_slots, "bad block ", block);
    }
    for (int64_t i = 0; i < q_len; ++i) {
      const int64_t t = q_begin + i;
      const int64_t last = ctx - q_len + i;  // causal: attends to context [0, last]
      for (int64_t h = 0; h < Hq; ++h) {
        const float* q = qkv.as<float>() + t * row + h * D;
        const int64_t kvh = h / group;
        scores.resize(last + 1);
        float mx = -INFINITY;
        for (int64_t j = 0; j <= last; ++j) {
          const float* k = kc + (slot_of[j] * Hkv + kvh) * D;
          float dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
          scores[j] = dot * p.scale;
          mx = std::max(mx, scores[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= last; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          sum += scores[j];
        }
        float* o = out.as<float>() + t * Hq * D + h * D;
        std::fill(o, o + D, 0.0f);
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j <= last; ++j) {
          const float w = scores[j] * inv;
          const float* v = vc + (slot_of[j] * Hkv + kvh) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
        }
      }
    }
  }
}

}  // namespace quilt::cpu
