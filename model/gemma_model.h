#pragma once
#include <optional>
#include <string>
#include <vector>

#include "model/gemma_config.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/weights.h"
#include "quilt/kernels/backend.h"
#include "runtime/comm/communicator.h"

namespace quilt {

// Which rows use which LoRA adapter. Rows in no segment run the base model alone; segments are
// disjoint row ranges (a sequence's rows are contiguous, so one segment per sequence works, and
// neighbouring sequences of one adapter may share one).
struct AdapterSegment {
  int32_t row_begin = 0, row_end = 0;
  const LoraAdapterShard* adapter = nullptr;  // this rank's shard, loaded by the caller
};
struct AdapterData {
  std::vector<AdapterSegment> segments;
  bool empty() const { return segments.empty(); }
};

// The seed's forward contract, one field per argument. A batch mixes prefill and decode
// sequences: sequence s owns query rows [cu_seqlen_prefill[s], cu_seqlen_prefill[s+1]) (a decode
// sequence owns one row), and those rows are the last tokens of its seqlen[s]-long context.
struct ForwardInputs {
  std::vector<int32_t> input_ids;          // [T]
  std::vector<int32_t> position_ids;       // [T]
  std::vector<int32_t> cu_seqlen_prefill;  // [S + 1], query-row offsets of every sequence
  std::vector<int32_t> block_tables;       // [S, max_blocks_per_seq], KV block ids
  int max_blocks_per_seq = 0;
  std::vector<int32_t> slots;              // [T], KV slot of each input token (< 0: padding)
  std::vector<int32_t> seqlen;             // [S], context length after this step
  int max_s = 0;                           // max of seqlen
  AdapterData adapter_data;
  std::vector<int32_t> prefill_cache_indices;  // sliding-window models only; must be empty
  std::vector<int32_t> lm_head_indices;        // rows that need logits; empty = every row
  bool skip_lm_head = false;
};

struct ForwardOutput {
  std::vector<float> logits;  // [M, vocab_size] on the host, M = rows asked for (0 if skipped)
  int64_t rows = 0;
  std::optional<std::vector<float>> speculative_logits;  // always empty: no speculation
};

class GemmaForCausalLM {
 public:
  // Loads this rank's shard from a checkpoint folder (config.json + safetensors).
  GemmaForCausalLM(const GemmaConfig& config, Backend& backend, Communicator& comm,
                   const Checkpoint& ckpt, const LoadProgress& progress = {});

  ForwardOutput forward(const ForwardInputs& in, KvCache& kv_cache);

  KvCache allocate_kv_cache(int num_blocks, int block_size = 16);
  // Shards a host adapter for this rank onto this model's backend (checked against the model).
  LoraAdapterShard load_adapter(const HostLoraAdapter& adapter);
  const GemmaConfig& config() const { return cfg_; }
  const TpLayout& tp() const { return tp_; }

 private:
  GemmaConfig cfg_;
  Backend& be_;
  Communicator& comm_;
  TpLayout tp_;
  GemmaWeights w_;
};

}  // namespace quilt
