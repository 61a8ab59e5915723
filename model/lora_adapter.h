#pragma once
// PEFT LoRA adapters for Gemma: reading adapter_config.json + adapter_model.safetensors into host
// memory (validated against the base model), and sharding one onto a backend for a
// tensor-parallel rank.
//   column layers (q, k, v, gate, up): A replicated, B sharded by output rows (KV-head
//     replication applies to k/v as to the base weights);
//   row layers (o, down): A sharded by input columns, B replicated; the rank's partial output
//     joins the base output before the all-reduce.
// The scale (alpha / r, or alpha / sqrt(r) with rsLoRA, per module from its own rank and alpha)
// is folded into B at load.
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "model/gemma_config.h"
#include "model/weights.h"
#include "quilt/kernels/backend.h"

namespace quilt {

enum class LoraTarget : int { q = 0, k, v, o, gate, up, down };
constexpr int kNumLoraTargets = 7;
const char* lora_target_name(LoraTarget t);

struct PeftLoraConfig {
  int r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool fan_in_fan_out = false;
  std::vector<std::string> target_modules;
  // Per-module overrides, in the file's order: PEFT takes the first key that matches the end of
  // the module path.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::string base_model_name_or_path;

  // Parses adapter_config.json text; refuses what Quilt cannot serve, naming it.
  static PeftLoraConfig from_json_text(const std::string& text, const std::string& source);
  // The rank and alpha of one module (e.g. "model.layers.3.mlp.down_proj"), patterns applied.
  std::pair<int, double> rank_alpha(const std::string& module_path) const;
  double scale(int rank, double alpha) const;
};

// One module's factors in fp32 on the host: A [r, in], B [out, r] with the scale folded in.
struct HostLoraModule {
  int rank = 0;
  float scale = 1;
  int64_t in = 0, out = 0;
  std::vector<float> A, B;
};

struct HostLoraAdapter {
  std::string name, dir;
  PeftLoraConfig config;
  // [layer][target], absent when the adapter does not touch that module
  std::vector<std::array<std::optional<HostLoraModule>, kNumLoraTargets>> layers;
  int max_rank = 0;
  size_t host_bytes() const;

  // Reads and validates an adapter folder against the base model. Throws quilt::Error naming
  // the file and the problem (missing file, corrupt safetensors, wrong shape, unsupported option).
  static HostLoraAdapter load(const std::string& dir, const std::string& name, const GemmaConfig& base);
};

// One module's shard on a backend: A [r, in_local], B [out_local, r] (B scaled).
struct LoraModuleShard {
  int rank = 0;
  Tensor A, B;
};

struct LoraAdapterShard {
  std::string name;
  std::vector<std::array<std::optional<LoraModuleShard>, kNumLoraTargets>> layers;
  size_t device_bytes = 0;
};

// One module's part for a tensor-parallel rank, on the host: A [rank, in_local], B [out_local, rank].
struct HostModuleShard {
  int rank = 0;
  int64_t in = 0, out = 0;  // local sizes
  std::vector<float> A, B;
};
// The (in, out) sizes of a target's weight on one rank.
std::pair<int64_t, int64_t> lora_local_dims(LoraTarget t, const GemmaConfig& c, const TpLayout& tp);
HostModuleShard shard_lora_module(const HostLoraModule& m, LoraTarget t, const GemmaConfig& c, const TpLayout& tp);

LoraAdapterShard shard_lora_adapter(const HostLoraAdapter& a, const GemmaConfig& c, const TpLayout& tp,
                                    Backend& be);

}  // namespace quilt
