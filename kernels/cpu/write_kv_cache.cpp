#include <cstring>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// CPU cache layout: [num_slots, Hkv, D] with slot = block * block_size + offset.
void write_kv_cache(Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& slots,
                    const KvWriteParams& p) {
  const int64_t T = qkv.dim(0), D = p.head_dim;
  const int64_t kv = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t row = static_cast<int64_t>(p.num_q_heads) * D + 2 * kv;
  const int64_t num_slots = k_cache.dim(0);
  QUILT_ASSERT(qkv.dim(1) == row && slots.numel() == T && k_cache.numel() == num_slots * kv);
  const int32_t* slot = slots.as<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) continue;  // padding
    QUILT_ASSERT(slot[t] < num_slots, "slot ", slot[t], " >= ", num_slots);
    const float* k = qkv.as<float>() + t * row + static_cast<int64_t>(p.num_q_heads) * D;
    std::memcpy(k_cache.as<float>() + slot[t] * kv, k, kv * sizeof(float));
    std::memcpy(v_cache.as<float>() + slot[t] * kv, k + kv, kv * sizeof(float));
  }
}

}  // namespace quilt::cpu
