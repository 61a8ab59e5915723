#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
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
  // Leave the logits on the backend (ForwardOutput::device_logits, for Backend::sample) instead
  // of downloading them.
  bool logits_on_device = false;
};

struct ForwardOutput {
  std::vector<float> logits;  // [M, vocab_size] on the host, M = rows asked for (0 if skipped)
  int64_t rows = 0;
  std::optional<std::vector<float>> speculative_logits;  // always empty: no speculation
  // With logits_on_device: [M_alloc, Vr] (one rank) or [P, M_alloc, Vr] (the all-gathered vocab
  // shards) on the backend, rows [0, rows) valid, columns past vocab_size padding; valid until
  // the next forward. `logits` is then empty.
  Tensor device_logits;
};

class GemmaForCausalLM {
 public:
  // Loads this rank's shard from a checkpoint folder (config.json + safetensors).
  GemmaForCausalLM(const GemmaConfig& config, Backend& backend, Communicator& comm,
                   const Checkpoint& ckpt, const LoadProgress& progress = {});

  // Takes this rank's shard as made elsewhere (benchmarks: random weights of real shapes). The
  // tensors must have the shapes load_gemma_weights gives for this layout.
  GemmaForCausalLM(const GemmaConfig& config, Backend& backend, Communicator& comm, GemmaWeights weights);

  ForwardOutput forward(const ForwardInputs& in, KvCache& kv_cache);

  // The KV cache in the model's KV dtype (set_kv_cache_dtype).
  KvCache allocate_kv_cache(int num_blocks, int block_size = 16);
  // Bytes of one KV block (every layer's k and v) on this rank, in the model's KV dtype.
  size_t kv_bytes_per_block(int block_size) const;
  // Storage of the caches allocate_kv_cache makes from now on: unset (the default) = the backend's
  // compute dtype; DType::fp8_e4m3 where the backend has it (cuda; the cpu backend refuses it when
  // the cache is allocated). Serving sets it from cuda.kv_cache_dtype.
  void set_kv_cache_dtype(std::optional<DType> dtype) { kv_dtype_ = dtype; }
  DType kv_cache_dtype() const { return kv_dtype_.value_or(be_.compute_dtype()); }

  // Decode steps (every sequence adds one token, logits for every row) of at most max_batch rows
  // replay a recorded graph (CUDA graphs) instead of launching each op: one per batch bucket (1, 2,
  // 4, ... up to max_batch), block-table width (a power of two) and whether the step has adapters
  // (its LoRA launches depend on the bucket only; the adapter mix is data, lora_plan.h). A
  // bucket's first step runs eagerly and records its graph; its tensors stay allocated. 0 (the
  // default) turns graphs off; a backend without graphs ignores this.
  void set_decode_graphs(int max_batch);
  // Whether the last forward() replayed a graph (tests and benchmarks).
  bool last_forward_replayed_graph() const { return last_replayed_; }
  // Shards a host adapter for this rank onto this model's backend (checked against the model).
  LoraAdapterShard load_adapter(const HostLoraAdapter& adapter);
  const GemmaConfig& config() const { return cfg_; }
  const TpLayout& tp() const { return tp_; }
  Backend& backend() const { return be_; }  // where device_logits live (Backend::sample)

 private:
  // Every tensor one step touches: i32 inputs, activations ([T, ...]) and lm_head rows ([M, ...]).
  struct StepTensors {
    Tensor ids, pos, slots, cu, lens, tables, rows;
    Tensor x, normed, qkv, attn, proj, gate_up, act;
    Tensor h, local, all;  // all: the gathered [P, M, Vr] (local itself when P == 1)
    const ForwardInputs* host = nullptr;  // eager steps: host cu_seqlen/seqlen for attention's plan
    // The step's LoRA plan (lora_plan.h) when it has adapters (lora_max_tiles > 0): its tiles and
    // partials; the table is lora_table_'s.
    Tensor lora_tiles, lora_part;
    int lora_max_tiles = 0, lora_max_rows = 0;
  };
  StepTensors allocate_step(int64_t T, int64_t S, int64_t M, int max_blocks);
  // Enqueues the whole step on the backend (no host work beyond launching, no allocation).
  void run_ops(StepTensors& t, int max_blocks, KvCache& kv);
  // Downloads rows [0, M) of the gathered logits ([P, M_alloc, Vr]) as [M, vocab] on the host.
  ForwardOutput download_logits(const Tensor& all, int64_t M, int64_t M_alloc);
  // The graph path of forward(); false when the step does not qualify.
  bool forward_graph(const ForwardInputs& in, const std::vector<AdapterSegment>& segments, KvCache& kv,
                     ForwardOutput& out);
  // Gives the step's adapters their table slots (uploading entries that changed) and returns the
  // tiles' i32 words for T rows (lora_tiles: words[0] tiles).
  std::vector<int32_t> lora_plan(const std::vector<AdapterSegment>& segments, int64_t T);
  // The table entries of one adapter shard ([layer][module]); lora_check checks its shapes, dtype
  // and ranks against this model (a clear error for an adapter that does not fit).
  void lora_entries(const LoraAdapterShard& a, std::vector<LoraEntry>& out) const;
  void lora_check(const LoraAdapterShard& a) const;

  // The first B rows of every tensor of `arena` (allocated for more rows), with its own tables.
  StepTensors rows_of(const StepTensors& arena, int64_t B, Tensor tables) const;

  struct DecodeGraph {
    StepTensors t;  // views of graph_arena_ (shared by every graph: they run one at a time)
    std::unique_ptr<BackendGraph> graph;
    uint64_t epoch = 0;
    const void* kv_key = nullptr;  // the cache the graph reads and writes
    uint64_t lora_epoch = 0;       // lora_table_'s epoch when recorded (steps with adapters)
  };

  GemmaConfig cfg_;
  Backend& be_;
  Communicator& comm_;
  TpLayout tp_;
  GemmaWeights w_;
  int graph_max_batch_ = 0;
  std::optional<DType> kv_dtype_;  // unset: the compute dtype
  StepTensors graph_arena_;                             // graph_max_batch_ rows
  std::map<std::tuple<int, int, bool>, DecodeGraph> graphs_;  // (batch bucket, block-table width, adapters)
  std::unique_ptr<LoraTable> lora_table_;  // made by the first step with adapters
  Tensor graph_lora_part_;                 // LoRA partials of the graphs (graph_max_batch_ tiles)
  std::vector<LoraEntry> lora_scratch_;    // lora_entries' output, reused
  bool last_replayed_ = false;
};

}  // namespace quilt
