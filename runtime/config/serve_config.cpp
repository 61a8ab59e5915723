#include "runtime/config/serve_config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>
#include <sstream>

#include "runtime/core/check.h"

namespace quilt {
namespace {

template <typename T>
void read(const YAML::Node& node, const std::string& path, const char* key, T& out,
          std::set<std::string>& known, const std::string& src) {
  known.insert(key);
  const YAML::Node v = node[key];
  if (!v || v.IsNull()) return;
  try {
    out = v.as<T>();
  } catch (const YAML::Exception&) {
    QUILT_FAIL(src, ": key '", path.empty() ? "" : path + ".", key, "' has a value of the wrong type");
  }
}

void reject_unknown(const YAML::Node& node, const std::string& path, const std::set<std::string>& known,
                    const std::string& src) {
  for (const auto& kv : node) {
    const std::string k = kv.first.as<std::string>();
    QUILT_REQUIRE(known.count(k), src, ": unknown key '", path.empty() ? "" : path + ".", k,
                  "' (see configs/README.md for the keys)");
  }
}

YAML::Node section(const YAML::Node& root, const char* name, const std::string& src) {
  const YAML::Node n = root[name];
  if (!n || n.IsNull()) return YAML::Node(YAML::NodeType::Map);
  QUILT_REQUIRE(n.IsMap(), src, ": key '", name, "' must be a mapping");
  return n;
}

}  // namespace

ServeConfig ServeConfig::from_yaml_text(const std::string& text, const std::string& src) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    QUILT_FAIL(src, ": not valid YAML (", e.what(), ")");
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  QUILT_REQUIRE(root.IsMap(), src, ": expected a mapping at the top level");
  ServeConfig c;
  std::set<std::string> top{"model", "http", "limits", "scheduler", "health", "adapters", "replicas",
                            "tensor_parallel", "backend", "log_level", "cuda"};
  reject_unknown(root, "", top, src);
  std::set<std::string> k;
  read(root, "", "replicas", c.replicas, k, src);
  read(root, "", "tensor_parallel", c.tensor_parallel, k, src);
  read(root, "", "backend", c.backend, k, src);
  read(root, "", "log_level", c.log_level, k, src);

  const YAML::Node model = section(root, "model", src);
  k.clear();
  read(model, "model", "path", c.model_path, k, src);
  read(model, "model", "id", c.model_id, k, src);
  reject_unknown(model, "model", k, src);

  const YAML::Node http = section(root, "http", src);
  k.clear();
  read(http, "http", "host", c.host, k, src);
  read(http, "http", "port", c.port, k, src);
  read(http, "http", "max_concurrent_requests", c.max_concurrent_requests, k, src);
  reject_unknown(http, "http", k, src);

  const YAML::Node lim = section(root, "limits", src);
  k.clear();
  read(lim, "limits", "max_input_length", c.max_input_length, k, src);
  read(lim, "limits", "max_total_tokens", c.max_total_tokens, k, src);
  read(lim, "limits", "default_max_new_tokens", c.default_max_new_tokens, k, src);
  read(lim, "limits", "max_stop_sequences", c.max_stop_sequences, k, src);
  read(lim, "limits", "max_best_of", c.max_best_of, k, src);
  reject_unknown(lim, "limits", k, src);

  const YAML::Node sch = section(root, "scheduler", src);
  k.clear();
  read(sch, "scheduler", "block_size", c.block_size, k, src);
  read(sch, "scheduler", "kv_blocks", c.kv_blocks, k, src);
  read(sch, "scheduler", "max_batch_prefill_tokens", c.max_batch_prefill_tokens, k, src);
  read(sch, "scheduler", "max_batch_total_tokens", c.max_batch_total_tokens, k, src);
  read(sch, "scheduler", "max_running_requests", c.max_running_requests, k, src);
  read(sch, "scheduler", "waiting_served_ratio", c.waiting_served_ratio, k, src);
  read(sch, "scheduler", "max_waiting_tokens", c.max_waiting_tokens, k, src);
  reject_unknown(sch, "scheduler", k, src);

  const YAML::Node ad = section(root, "adapters", src);
  k.clear();
  read(ad, "adapters", "roots", c.adapter_roots, k, src);
  read(ad, "adapters", "hub_cache", c.adapter_hub_cache, k, src);
  read(ad, "adapters", "slots", c.adapter_slots, k, src);
  read(ad, "adapters", "max_rank", c.adapter_max_rank, k, src);
  read(ad, "adapters", "host_cache_mb", c.adapter_host_cache_mb, k, src);
  read(ad, "adapters", "preload", c.adapter_preload, k, src);
  read(ad, "adapters", "max_active_adapters", c.max_active_adapters, k, src);
  read(ad, "adapters", "adapter_cycle_time_s", c.adapter_cycle_time_s, k, src);
  read(ad, "adapters", "retry_backoff_s", c.adapter_retry_backoff_s, k, src);
  read(ad, "adapters", "placement", c.placement, k, src);
  read(ad, "adapters", "overload_slack", c.adapter_overload_slack, k, src);
  reject_unknown(ad, "adapters", k, src);

  const YAML::Node cu = section(root, "cuda", src);
  k.clear();
  read(cu, "cuda", "graphs_max_batch", c.cuda_graphs_max_batch, k, src);
  read(cu, "cuda", "gpu_memory_fraction", c.gpu_memory_fraction, k, src);
  read(cu, "cuda", "kv_cache_dtype", c.cuda_kv_cache_dtype, k, src);
  reject_unknown(cu, "cuda", k, src);

  const YAML::Node health = section(root, "health", src);
  k.clear();
  read(health, "health", "heartbeat_interval_s", c.heartbeat_interval_s, k, src);
  read(health, "health", "heartbeat_timeout_s", c.heartbeat_timeout_s, k, src);
  reject_unknown(health, "health", k, src);

  QUILT_REQUIRE(c.replicas >= 1, src, ": 'replicas' must be >= 1");
  QUILT_REQUIRE(c.tensor_parallel >= 1, src, ": 'tensor_parallel' must be >= 1");
  QUILT_REQUIRE(c.port >= 0 && c.port <= 65535, src, ": 'http.port' must be in [0, 65535]");
  QUILT_REQUIRE(c.max_concurrent_requests >= 1, src, ": 'http.max_concurrent_requests' must be >= 1");
  QUILT_REQUIRE(c.max_input_length >= 1, src, ": 'limits.max_input_length' must be >= 1");
  QUILT_REQUIRE(c.max_total_tokens > c.max_input_length, src,
                ": 'limits.max_total_tokens' must be greater than 'limits.max_input_length'");
  QUILT_REQUIRE(c.default_max_new_tokens >= 1, src, ": 'limits.default_max_new_tokens' must be >= 1");
  QUILT_REQUIRE(c.max_stop_sequences >= 0, src, ": 'limits.max_stop_sequences' must be >= 0");
  QUILT_REQUIRE(c.max_best_of == 1, src, ": 'limits.max_best_of' other than 1 is not supported");
  QUILT_REQUIRE(c.block_size >= 1, src, ": 'scheduler.block_size' must be >= 1");
  QUILT_REQUIRE(c.kv_blocks >= 0, src, ": 'scheduler.kv_blocks' must be >= 0");
  QUILT_REQUIRE(c.cuda_graphs_max_batch >= 0 && c.cuda_graphs_max_batch <= 1024, src,
                ": 'cuda.graphs_max_batch' must be in [0, 1024]");
  QUILT_REQUIRE(c.gpu_memory_fraction > 0 && c.gpu_memory_fraction <= 1, src,
                ": 'cuda.gpu_memory_fraction' must be in (0, 1]");
  QUILT_REQUIRE(c.cuda_kv_cache_dtype == "auto" || c.cuda_kv_cache_dtype == "fp8_e4m3", src,
                ": 'cuda.kv_cache_dtype' must be auto or fp8_e4m3, not '", c.cuda_kv_cache_dtype, "'");
  QUILT_REQUIRE(c.cuda_kv_cache_dtype == "auto" || c.backend == "cuda", src,
                ": 'cuda.kv_cache_dtype' ", c.cuda_kv_cache_dtype, " needs backend cuda (the ", c.backend,
                " backend keeps its KV cache in its compute dtype: use auto)");
  QUILT_REQUIRE(c.max_batch_prefill_tokens >= c.max_input_length, src,
                ": 'scheduler.max_batch_prefill_tokens' must be >= 'limits.max_input_length' (a prompt must fit one prefill)");
  QUILT_REQUIRE(c.max_batch_total_tokens >= c.max_total_tokens, src,
                ": 'scheduler.max_batch_total_tokens' must be >= 'limits.max_total_tokens' (a request must fit the batch)");
  QUILT_REQUIRE(static_cast<int64_t>(c.effective_kv_blocks()) * c.block_size >= c.max_total_tokens, src,
                ": 'scheduler.kv_blocks' is too small to hold one request of 'limits.max_total_tokens'");
  QUILT_REQUIRE(c.max_running_requests >= 1, src, ": 'scheduler.max_running_requests' must be >= 1");
  QUILT_REQUIRE(c.waiting_served_ratio >= 0, src, ": 'scheduler.waiting_served_ratio' must be >= 0");
  QUILT_REQUIRE(c.max_waiting_tokens >= 1, src, ": 'scheduler.max_waiting_tokens' must be >= 1");
  QUILT_REQUIRE(c.adapter_slots >= 0, src, ": 'adapters.slots' must be >= 0");
  QUILT_REQUIRE(c.adapter_max_rank >= 1, src, ": 'adapters.max_rank' must be >= 1");
  QUILT_REQUIRE(c.adapter_host_cache_mb >= 0, src, ": 'adapters.host_cache_mb' must be >= 0");
  QUILT_REQUIRE(c.max_active_adapters >= 1, src, ": 'adapters.max_active_adapters' must be >= 1");
  QUILT_REQUIRE(c.adapter_cycle_time_s >= 0, src, ": 'adapters.adapter_cycle_time_s' must be >= 0");
  QUILT_REQUIRE(c.adapter_retry_backoff_s >= 0, src, ": 'adapters.retry_backoff_s' must be >= 0");
  QUILT_REQUIRE(c.placement == "affinity" || c.placement == "round_robin", src,
                ": 'adapters.placement' must be affinity or round_robin, not '", c.placement, "'");
  QUILT_REQUIRE(c.adapter_overload_slack >= 1, src, ": 'adapters.overload_slack' must be >= 1");
  QUILT_REQUIRE(static_cast<int>(c.adapter_preload.size()) <= c.adapter_slots, src,
                ": 'adapters.preload' lists more adapters than 'adapters.slots'");
  QUILT_REQUIRE(c.heartbeat_interval_s > 0 && c.heartbeat_timeout_s > c.heartbeat_interval_s, src,
                ": 'health.heartbeat_timeout_s' must exceed 'health.heartbeat_interval_s' > 0");
  return c;
}

ServeConfig ServeConfig::from_file(const std::string& path) {
  std::ifstream in(path);
  QUILT_REQUIRE(in.good(), "cannot read config file '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_yaml_text(ss.str(), path);
}

int ServeConfig::effective_kv_blocks() const {
  return kv_blocks > 0 ? kv_blocks
                       : static_cast<int>((max_batch_total_tokens + block_size - 1) / block_size);
}

std::string ServeConfig::to_yaml() const {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::BeginMap << YAML::Key << "path" << YAML::Value
    << model_path << YAML::Key << "id" << YAML::Value << model_id << YAML::EndMap;
  e << YAML::Key << "backend" << YAML::Value << backend;
  e << YAML::Key << "replicas" << YAML::Value << replicas;
  e << YAML::Key << "tensor_parallel" << YAML::Value << tensor_parallel;
  e << YAML::Key << "http" << YAML::Value << YAML::BeginMap << YAML::Key << "host" << YAML::Value << host
    << YAML::Key << "port" << YAML::Value << port << YAML::Key << "max_concurrent_requests" << YAML::Value
    << max_concurrent_requests << YAML::EndMap;
  e << YAML::Key << "limits" << YAML::Value << YAML::BeginMap << YAML::Key << "max_input_length"
    << YAML::Value << max_input_length << YAML::Key << "max_total_tokens" << YAML::Value << max_total_tokens
    << YAML::Key << "default_max_new_tokens" << YAML::Value << default_max_new_tokens << YAML::Key
    << "max_stop_sequences" << YAML::Value << max_stop_sequences << YAML::Key << "max_best_of" << YAML::Value
    << max_best_of << YAML::EndMap;
  e << YAML::Key << "scheduler" << YAML::Value << YAML::BeginMap << YAML::Key << "block_size" << YAML::Value
    << block_size << YAML::Key << "kv_blocks" << YAML::Value << effective_kv_blocks() << YAML::Key
    << "max_batch_prefill_tokens" << YAML::Value << max_batch_prefill_tokens << YAML::Key
    << "max_batch_total_tokens" << YAML::Value << max_batch_total_tokens << YAML::Key << "max_running_requests"
    << YAML::Value << max_running_requests << YAML::Key << "waiting_served_ratio" << YAML::Value
    << waiting_served_ratio << YAML::Key << "max_waiting_tokens" << YAML::Value << max_waiting_tokens
    << YAML::EndMap;
  e << YAML::Key << "adapters" << YAML::Value << YAML::BeginMap << YAML::Key << "roots" << YAML::Value
    << YAML::Flow << adapter_roots << YAML::Key << "hub_cache" << YAML::Value << adapter_hub_cache << YAML::Key
    << "slots" << YAML::Value << adapter_slots << YAML::Key << "max_rank" << YAML::Value << adapter_max_rank
    << YAML::Key << "host_cache_mb" << YAML::Value << adapter_host_cache_mb << YAML::Key << "preload"
    << YAML::Value << YAML::Flow << adapter_preload << YAML::Key << "max_active_adapters" << YAML::Value
    << max_active_adapters << YAML::Key << "adapter_cycle_time_s" << YAML::Value << adapter_cycle_time_s
    << YAML::Key << "retry_backoff_s" << YAML::Value << adapter_retry_backoff_s << YAML::Key << "placement"
    << YAML::Value << placement << YAML::Key << "overload_slack" << YAML::Value << adapter_overload_slack << YAML::EndMap;
  e << YAML::Key << "cuda" << YAML::Value << YAML::BeginMap << YAML::Key << "graphs_max_batch" << YAML::Value
    << cuda_graphs_max_batch << YAML::Key << "gpu_memory_fraction" << YAML::Value << gpu_memory_fraction
    << YAML::Key << "kv_cache_dtype" << YAML::Value << cuda_kv_cache_dtype << YAML::EndMap;
  e << YAML::Key << "health" << YAML::Value << YAML::BeginMap << YAML::Key << "heartbeat_interval_s"
    << YAML::Value << heartbeat_interval_s << YAML::Key << "heartbeat_timeout_s" << YAML::Value
    << heartbeat_timeout_s << YAML::EndMap;
  e << YAML::Key << "log_level" << YAML::Value << log_level;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace quilt
