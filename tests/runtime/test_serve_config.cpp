#include <gtest/gtest.h>

#include "runtime/config/serve_config.h"
#include "runtime/core/check.h"

using quilt::ServeConfig;

namespace {
std::string error_of(const std::string& yaml) {
  try {
    ServeConfig::from_yaml_text(yaml, "test.yaml");
  } catch (const quilt::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(ServeConfig, EmptyFileGivesDefaults) {
  const auto c = ServeConfig::from_yaml_text("");
  EXPECT_EQ(c.model_path, "");
  EXPECT_EQ(c.replicas, 1);
  EXPECT_EQ(c.tensor_parallel, 1);
  EXPECT_EQ(c.port, 8080);
  EXPECT_EQ(c.block_size, 16);
  EXPECT_EQ(c.effective_kv_blocks(), 16384 / 16);
  EXPECT_EQ(c.world_size(), 2);
}

TEST(ServeConfig, ReadsEverySection) {
  const auto c = ServeConfig::from_yaml_text(R"(
model: {path: /models/gemma-2b, id: gemma-2b}
backend: cpu
replicas: 2
tensor_parallel: 2
http: {host: 0.0.0.0, port: 9000, max_concurrent_requests: 64}
limits: {max_input_length: 100, max_total_tokens: 200, default_max_new_tokens: 8, max_stop_sequences: 2}
scheduler: {block_size: 8, kv_blocks: 100, max_batch_prefill_tokens: 512, max_batch_total_tokens: 800,
            max_running_requests: 16, waiting_served_ratio: 0.5, max_waiting_tokens: 5}
health: {heartbeat_interval_s: 0.5, heartbeat_timeout_s: 3}
log_level: debug
)");
  EXPECT_EQ(c.model_path, "/models/gemma-2b");
  EXPECT_EQ(c.model_id, "gemma-2b");
  EXPECT_EQ(c.world_size(), 5);
  EXPECT_EQ(c.host, "0.0.0.0");
  EXPECT_EQ(c.port, 9000);
  EXPECT_EQ(c.max_input_length, 100);
  EXPECT_EQ(c.effective_kv_blocks(), 100);
  EXPECT_DOUBLE_EQ(c.waiting_served_ratio, 0.5);
  EXPECT_EQ(c.max_waiting_tokens, 5);
  EXPECT_DOUBLE_EQ(c.heartbeat_timeout_s, 3);
  // what to_yaml prints reads back the same
  const auto d = ServeConfig::from_yaml_text(c.to_yaml());
  EXPECT_EQ(d.to_yaml(), c.to_yaml());
}

TEST(ServeConfig, ErrorsNameTheKey) {
  EXPECT_NE(error_of("replica: 2").find("'replica'"), std::string::npos);
  EXPECT_NE(error_of("http: {prot: 1}").find("'http.prot'"), std::string::npos);
  EXPECT_NE(error_of("http: {port: abc}").find("'http.port'"), std::string::npos);
  EXPECT_NE(error_of("http: {port: 70000}").find("http.port"), std::string::npos);
  EXPECT_NE(error_of("replicas: 0").find("replicas"), std::string::npos);
  EXPECT_NE(error_of("limits: {max_input_length: 10, max_total_tokens: 5}").find("max_total_tokens"), std::string::npos);
  EXPECT_NE(error_of("scheduler: {kv_blocks: 1}").find("kv_blocks"), std::string::npos);
  EXPECT_NE(error_of("model: [1, 2]").find("'model'"), std::string::npos);
  EXPECT_NE(error_of("a: [").find("not valid YAML"), std::string::npos);
  EXPECT_NE(error_of("limits: {max_best_of: 2}").find("max_best_of"), std::string::npos);
  EXPECT_NE(error_of("cuda: {gpu_memory_fraction: 1.5}").find("cuda.gpu_memory_fraction"), std::string::npos);
  EXPECT_NE(error_of("cuda: {gpu_memory_fraction: 0}").find("cuda.gpu_memory_fraction"), std::string::npos);
  EXPECT_NE(error_of("cuda: {graphs_max_batch: -1}").find("cuda.graphs_max_batch"), std::string::npos);
  EXPECT_NE(error_of("cuda: {graph_max_batch: 8}").find("'cuda.graph_max_batch'"), std::string::npos);
  EXPECT_NE(error_of("backend: cuda\ncuda: {kv_cache_dtype: fp8}").find("'cuda.kv_cache_dtype'"), std::string::npos);
  // The cpu backend has no fp8 KV cache: refused at start, not ignored.
  EXPECT_NE(error_of("cuda: {kv_cache_dtype: fp8_e4m3}").find("'cuda.kv_cache_dtype'"), std::string::npos);
}

TEST(ServeConfig, CudaKeys) {
  const auto d = ServeConfig::from_yaml_text("");
  EXPECT_EQ(d.cuda_graphs_max_batch, 256);
  EXPECT_DOUBLE_EQ(d.gpu_memory_fraction, 0.9);
  const auto c = ServeConfig::from_yaml_text("cuda: {graphs_max_batch: 0, gpu_memory_fraction: 0.5}");
  EXPECT_EQ(c.cuda_graphs_max_batch, 0);
  EXPECT_DOUBLE_EQ(c.gpu_memory_fraction, 0.5);
  // The printed config reads back the same.
  const auto back = ServeConfig::from_yaml_text(c.to_yaml());
  EXPECT_EQ(back.cuda_graphs_max_batch, 0);
  EXPECT_DOUBLE_EQ(back.gpu_memory_fraction, 0.5);
  EXPECT_EQ(d.cuda_kv_cache_dtype, "auto");
  const auto f = ServeConfig::from_yaml_text("backend: cuda\ncuda: {kv_cache_dtype: fp8_e4m3}");
  EXPECT_EQ(f.cuda_kv_cache_dtype, "fp8_e4m3");
  EXPECT_EQ(ServeConfig::from_yaml_text(f.to_yaml()).cuda_kv_cache_dtype, "fp8_e4m3");
}
