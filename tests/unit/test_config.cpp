#include <gtest/gtest.h>

#include "model/gemma_config.h"
#include "runtime/core/check.h"

using quilt::DType;
using quilt::GemmaConfig;

namespace {
// gemma-2b's config.json as first released.
const char* kOriginal = R"({
  "architectures": ["GemmaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu",
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 16384,
  "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
  "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
  "transformers_version": "4.38.0.dev0", "use_cache": true, "vocab_size": 256000})";

// The same shapes as transformers 5.x writes them.
const char* kNew = R"({
  "architectures": ["GemmaForCausalLM"], "bos_token_id": 2, "dtype": "float16",
  "eos_token_id": [1, 107], "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 3072, "intermediate_size": 24576, "max_position_embeddings": 8192,
  "model_type": "gemma", "num_attention_heads": 16, "num_hidden_layers": 28,
  "num_key_value_heads": 16, "pad_token_id": 0, "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "vocab_size": 256000})";

std::string error_of(const std::string& text) {
  try {
    GemmaConfig::from_json_text(text);
  } catch (const quilt::Error& e) {
    return e.what();
  }
  return "";
}

// Replaces `from` (which must occur) in the original config.
std::string edit(const std::string& base, const std::string& from, const std::string& to) {
  std::string s = base;
  const auto at = s.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return s.replace(at, from.size(), to);
}
}  // namespace

TEST(GemmaConfig, OriginalLayout) {
  const auto c = GemmaConfig::from_json_text(kOriginal);
  EXPECT_EQ(c.vocab_size, 256000);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 16384);
  EXPECT_EQ(c.num_hidden_layers, 18);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 1);
  EXPECT_EQ(c.head_dim, 256);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.f);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(c.dtype, DType::bf16);
  EXPECT_EQ(c.activation, "gelu_pytorch_tanh");
  EXPECT_EQ(c.eos_token_ids, std::vector<int>{1});
}

TEST(GemmaConfig, TransformersFiveLayout) {
  const auto c = GemmaConfig::from_json_text(kNew);
  EXPECT_EQ(c.hidden_size, 3072);
  EXPECT_EQ(c.head_dim, 256);  // not hidden / heads (192)
  EXPECT_EQ(c.num_key_value_heads, 16);
  EXPECT_FLOAT_EQ(c.rope_theta, 500.f);
  EXPECT_EQ(c.dtype, DType::f16);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int>{1, 107}));
}

TEST(GemmaConfig, Defaults) {
  const auto c = GemmaConfig::from_json_text(
      R"({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
          "num_attention_heads": 2})");
  EXPECT_EQ(c.head_dim, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.f);
}

TEST(GemmaConfig, RejectsUnsupportedFieldsByName) {
  struct Case { std::string text, must_name; };
  const std::vector<Case> cases = {
      {edit(kOriginal, R"(["GemmaForCausalLM"])", R"(["LlamaForCausalLM"])"), "architectures"},
      {edit(kOriginal, R"("model_type": "gemma")", R"("model_type": "gemma2")"), "model_type"},
      {edit(kOriginal, R"("rope_scaling": null)", R"("rope_scaling": {"type": "linear", "factor": 2.0})"), "rope_scaling"},
      {edit(kNew, R"("rope_type": "default")", R"("rope_type": "yarn")"), "rope_parameters.rope_type"},
      {edit(kOriginal, R"("hidden_act": "gelu")", R"("hidden_act": "relu")"), "hidden_act"},
      {edit(kNew, R"("hidden_activation": "gelu_pytorch_tanh")", R"("hidden_activation": "gelu")"), "hidden_activation"},
      {edit(kOriginal, R"("torch_dtype": "bfloat16")", R"("torch_dtype": "int8")"), "torch_dtype"},
      {edit(kOriginal, R"("num_key_value_heads": 1)", R"("num_key_value_heads": 3)"), "num_key_value_heads"},
      {edit(kOriginal, R"("vocab_size": 256000)", R"("vocab_size": -5)"), "vocab_size"},
      {edit(kOriginal, R"("hidden_size": 2048,)", ""), "hidden_size"},
      {edit(kOriginal, R"("attention_bias": false)", R"("attention_bias": true)"), "attention_bias"},
      {edit(kOriginal, R"("num_hidden_layers": 18)", R"("num_hidden_layers": "18")"), "num_hidden_layers"},
      {edit(kOriginal, R"("head_dim": 256)", R"("head_dim": 255)"), "head_dim"},
      {std::string(kOriginal).substr(0, 100), "not valid JSON"},
      {"[1, 2]", "JSON object"},
  };
  for (const auto& c : cases) {
    const std::string err = error_of(c.text);
    EXPECT_NE(err.find(c.must_name), std::string::npos) << "error '" << err << "' should name " << c.must_name;
  }
}

TEST(GemmaConfig, TiedEmbeddingsOnly) {
  const std::string err = error_of(edit(kOriginal, R"("use_cache": true)", R"("tie_word_embeddings": false)"));
  EXPECT_NE(err.find("tie_word_embeddings"), std::string::npos) << err;
}

TEST(GemmaConfig, MissingFileIsAClearError) {
  try {
    GemmaConfig::from_file("/nonexistent/config.json");
    FAIL() << "expected an error";
  } catch (const quilt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/config.json"), std::string::npos);
  }
}

#include "model/weights.h"

TEST(TpLayout, SplitsHeadsAndReplicatesKvHeads) {
  const auto g2b = GemmaConfig::from_json_text(kOriginal);  // 8 heads, 1 KV head
  for (int tp : {1, 2, 4, 8}) {
    for (int r = 0; r < tp; ++r) {
      const auto t = quilt::TpLayout::make(g2b, r, tp);
      EXPECT_EQ(t.q_heads, 8 / tp);
      EXPECT_EQ(t.q_head_begin, r * 8 / tp);
      EXPECT_EQ(t.kv_heads, 1);
      EXPECT_EQ(t.kv_head_begin, 0);
      EXPECT_EQ(t.intermediate, 16384 / tp);
      EXPECT_EQ(t.vocab_per_rank, 256000 / tp);
    }
  }
  const auto g7b = GemmaConfig::from_json_text(kNew);  // 16 heads, 16 KV heads
  const auto t = quilt::TpLayout::make(g7b, 3, 4);
  EXPECT_EQ(t.kv_heads, 4);
  EXPECT_EQ(t.kv_head_begin, 12);
  // GQA 8 heads over 2 KV heads at tp 4: ranks 0,1 hold KV head 0 and ranks 2,3 KV head 1.
  auto gqa = g2b;
  gqa.num_key_value_heads = 2;
  EXPECT_EQ(quilt::TpLayout::make(gqa, 1, 4).kv_head_begin, 0);
  EXPECT_EQ(quilt::TpLayout::make(gqa, 2, 4).kv_head_begin, 1);
  // A vocabulary that does not divide: the last shard is padded.
  auto odd = g2b;
  odd.vocab_size = 10;
  EXPECT_EQ(quilt::TpLayout::make(odd, 3, 4).vocab_per_rank, 3);
  EXPECT_EQ(quilt::TpLayout::make(odd, 3, 4).vocab_begin, 9);
}

TEST(TpLayout, RefusesSplitsThatDoNotDivide) {
  const auto g2b = GemmaConfig::from_json_text(kOriginal);
  try {
    quilt::TpLayout::make(g2b, 0, 3);
    FAIL();
  } catch (const quilt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_attention_heads"), std::string::npos) << e.what();
  }
  auto gqa = g2b;
  gqa.num_key_value_heads = 4;
  gqa.num_attention_heads = 8;
  EXPECT_NO_THROW(quilt::TpLayout::make(gqa, 0, 8));
  gqa.num_attention_heads = 24;
  gqa.num_key_value_heads = 3;
  EXPECT_THROW(quilt::TpLayout::make(gqa, 0, 2), quilt::Error);
}
