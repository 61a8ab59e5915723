#pragma once
// The paged KV cache of one rank: per layer, k and v storage for num_blocks blocks of
// block_size token slots, in the backend's layout. Slot s lives in block s / block_size.
#include <optional>
#include <vector>

#include "quilt/kernels/backend.h"

namespace quilt {

struct KvCache {
  int num_blocks = 0;
  int block_size = 16;
  DType dtype = DType::f32;  // storage: the compute dtype, or fp8_e4m3 (Backend::kv_cache_tensor)
  std::vector<Tensor> k, v;  // one per layer

  // dtype: the backend's compute dtype when unset.
  static KvCache allocate(Backend& be, int num_layers, int num_blocks, int block_size,
                          int num_kv_heads, int head_dim, std::optional<DType> dtype = std::nullopt) {
    KvCache c;
    c.num_blocks = num_blocks;
    c.block_size = block_size;
    c.dtype = dtype.value_or(be.compute_dtype());
    for (int l = 0; l < num_layers; ++l) {
      c.k.push_back(be.kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, c.dtype));
      c.v.push_back(be.kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, c.dtype));
    }
    return c;
  }
};

}  // namespace quilt
