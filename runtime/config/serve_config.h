#pragma once
// The serving job's configuration, read from YAML (`quilt serve --config FILE`). yaml-cpp stays
// inside this folder. Every key has a default; configs/README.md is the table of keys, and
// `quilt serve --print-config` prints the effective values.
#include <cstdint>
#include <string>
#include <vector>

namespace quilt {

struct ServeConfig {
  // model
  std::string model_path;  // Hugging Face Gemma folder; empty = the embedded tiny model
  std::string model_id;    // name in /info and /v1/models; default: the folder's name
  std::string backend = "cpu";
  // topology: mpirun -np 1 + replicas * tensor_parallel
  int replicas = 1;
  int tensor_parallel = 1;
  // http
  std::string host = "127.0.0.1";
  int port = 8080;
  int max_concurrent_requests = 1024;  // requests accepted and not finished; more get 429
  // request limits (tokens)
  int max_input_length = 1024;   // prompt tokens after truncation
  int max_total_tokens = 2048;   // prompt + max_new_tokens
  int default_max_new_tokens = 20;
  int max_stop_sequences = 4;
  int max_best_of = 1;
  // scheduler (per replica; LoRAX's meanings)
  int block_size = 16;                   // tokens per KV block
  int kv_blocks = 0;                     // KV blocks per replica; 0 = max_batch_total_tokens / block_size
  int64_t max_batch_prefill_tokens = 4096;
  int64_t max_batch_total_tokens = 16384;
  int max_running_requests = 256;
  double waiting_served_ratio = 1.2;
  int max_waiting_tokens = 20;
  // adapters (multi-LoRA)
  std::vector<std::string> adapter_roots;   // folders of adapter folders that adapter_id resolves in
  std::string adapter_hub_cache;            // offline HF hub cache; empty = $HF_HUB_CACHE / $HF_HOME/hub / ~/.cache/huggingface/hub
  int adapter_slots = 8;                    // adapters resident at once per replica (memory reserved at start)
  int adapter_max_rank = 64;                // the largest LoRA rank a slot holds
  int adapter_host_cache_mb = 1024;         // host RAM per worker rank for adapters read from disk
  std::vector<std::string> adapter_preload; // adapter ids loaded on every replica at start
  int max_active_adapters = 128;            // adapters in a running batch at once (capped at slots; the base model takes none)
  double adapter_cycle_time_s = 2.0;        // how long an active adapter keeps admitting while others wait
  double adapter_retry_backoff_s = 30.0;    // a failed adapter is retried after this long
  std::string placement = "affinity";       // affinity | round_robin
  int adapter_overload_slack = 16;          // requests by which a replica must exceed the least loaded to count as overloaded
  // cuda (the cuda backend only)
  int cuda_graphs_max_batch = 256;     // decode batches up to this size replay CUDA graphs; 0 = off
  double gpu_memory_fraction = 0.90;   // share of each GPU's memory the worker may use (weights, activations, KV)
  std::string cuda_kv_cache_dtype = "auto";  // auto (the compute dtype) | fp8_e4m3 (e4m3 values, per-token-head scales)
  // health
  double heartbeat_interval_s = 1.0;   // workers report this often
  double heartbeat_timeout_s = 10.0;   // a worker silent this long makes /health fail
  std::string log_level = "info";

  // Parses YAML text; unknown keys and bad values are errors that name the key.
  static ServeConfig from_yaml_text(const std::string& text, const std::string& source = "config");
  static ServeConfig from_file(const std::string& path);
  int world_size() const { return 1 + replicas * tensor_parallel; }
  int effective_kv_blocks() const;
  std::string to_yaml() const;
};

}  // namespace quilt
