#pragma once
// How each Gemma weight is sharded across a tensor-parallel group, and loading a rank's shard.
//   q/k/v/gate/up: column-parallel (rows of W[out, in]); o/down: row-parallel (columns);
//   embedding (= tied lm_head): vocab-parallel rows, padded to a multiple of tp;
//   norms: replicated. When tp > num_kv_heads, KV heads are replicated: rank r holds KV head
//   r / (tp / num_kv_heads).
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/gemma_config.h"
#include "model/safetensors.h"
#include "quilt/kernels/backend.h"

namespace quilt {

struct TpLayout {
  int rank = 0, size = 1;
  int q_heads = 0, q_head_begin = 0;    // this rank's query heads
  int kv_heads = 0, kv_head_begin = 0;  // this rank's KV heads (replicated when tp > kv)
  int64_t intermediate = 0, intermediate_begin = 0;
  int64_t vocab_per_rank = 0, vocab_begin = 0;  // padded shard size, first id of this shard

  // Throws naming the constraint when the config cannot be split `size` ways.
  static TpLayout make(const GemmaConfig& c, int rank, int size);
};

struct LayerWeights {
  Tensor input_norm;   // [H]
  Tensor qkv;          // [(q_heads + 2 kv_heads) * D, H]
  Tensor o;            // [H, q_heads * D]
  Tensor post_norm;    // [H]
  Tensor gate_up;      // [2 I_local, H]
  Tensor down;         // [H, I_local]
};

struct GemmaWeights {
  Tensor embed;  // [vocab_per_rank, H], rows past the vocabulary are zero
  Tensor final_norm;  // [H]
  std::vector<LayerWeights> layers;
};

// Progress callback: bytes read so far and the total for this rank.
using LoadProgress = std::function<void(size_t done, size_t total)>;

GemmaWeights load_gemma_weights(const Checkpoint& ckpt, const GemmaConfig& c, const TpLayout& tp,
                                Backend& backend, const LoadProgress& progress = {});

}  // namespace quilt
