#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quilt/kernels/dtype.h"

namespace quilt {

// The parts of a Hugging Face Gemma config.json that Quilt uses. Both layouts load: the original
// release (top-level rope_theta, hidden_act "gelu" meaning the tanh approximation, torch_dtype)
// and transformers 5.x (rope_parameters.rope_theta, hidden_activation, dtype).
struct GemmaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.f;
  int64_t max_position_embeddings = 8192;
  DType dtype = DType::bf16;   // the checkpoint's stored dtype as the config states it
  int bos_token_id = 2;
  std::vector<int> eos_token_ids{1};
  int pad_token_id = 0;
  std::string activation = "gelu_pytorch_tanh";  // normalised name; only the tanh GELU runs

  // Parses config.json text. `source` names the file in error messages.
  static GemmaConfig from_json_text(const std::string& text, const std::string& source = "config.json");
  static GemmaConfig from_file(const std::string& path);
  std::string summary() const;
};

// EOS ids of a checkpoint folder: config.json's eos_token_id together with
// generation_config.json's (when present), without duplicates.
std::vector<int> load_eos_ids(const std::string& model_dir, const GemmaConfig& config);

}  // namespace quilt
