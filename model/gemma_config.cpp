#include "model/gemma_config.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/core/check.h"

namespace quilt {
namespace {
using json = nlohmann::json;

template <typename T>
T get_number(const json& j, const std::string& key, const std::string& src, bool required, T dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    QUILT_REQUIRE(!required, src, ": missing required field '", key, "'");
    return dflt;
  }
  QUILT_REQUIRE(it->is_number(), src, ": field '", key, "' must be a number, got ", it->dump());
  return it->get<T>();
}

DType parse_dtype(const std::string& s, const std::string& src, const std::string& key) {
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::f16;
  if (s == "float32") return DType::f32;
  QUILT_FAIL(src, ": field '", key, "' is \"", s, "\"; Quilt loads bfloat16, float16 or float32");
}
}  // namespace

GemmaConfig GemmaConfig::from_json_text(const std::string& text, const std::string& src) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    QUILT_FAIL(src, ": not valid JSON (", e.what(), ")");
  }
  QUILT_REQUIRE(j.is_object(), src, ": expected a JSON object");
  GemmaConfig c;

  if (auto it = j.find("architectures"); it != j.end() && !it->is_null()) {
    QUILT_REQUIRE(it->is_array(), src, ": field 'architectures' must be a list");
    for (const auto& a : *it)
      QUILT_REQUIRE(a.is_string() && a.get<std::string>() == "GemmaForCausalLM", src,
                    ": field 'architectures' names ", a.dump(),
                    "; Quilt serves only GemmaForCausalLM");
  }
  if (auto it = j.find("model_type"); it != j.end() && !it->is_null())
    QUILT_REQUIRE(it->is_string() && it->get<std::string>() == "gemma", src,
                  ": field 'model_type' is ", it->dump(), "; Quilt serves only \"gemma\"");

  c.vocab_size = get_number<int64_t>(j, "vocab_size", src, true, 0);
  c.hidden_size = get_number<int64_t>(j, "hidden_size", src, true, 0);
  c.intermediate_size = get_number<int64_t>(j, "intermediate_size", src, true, 0);
  c.num_hidden_layers = get_number<int>(j, "num_hidden_layers", src, true, 0);
  c.num_attention_heads = get_number<int>(j, "num_attention_heads", src, true, 0);
  c.num_key_value_heads = get_number<int>(j, "num_key_value_heads", src, false, c.num_attention_heads);
  QUILT_REQUIRE(c.vocab_size > 0, src, ": field 'vocab_size' must be positive");
  QUILT_REQUIRE(c.hidden_size > 0, src, ": field 'hidden_size' must be positive");
  QUILT_REQUIRE(c.intermediate_size > 0, src, ": field 'intermediate_size' must be positive");
  QUILT_REQUIRE(c.num_hidden_layers > 0, src, ": field 'num_hidden_layers' must be positive");
  QUILT_REQUIRE(c.num_attention_heads > 0, src, ": field 'num_attention_heads' must be positive");
  QUILT_REQUIRE(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0,
                src, ": field 'num_key_value_heads' (", c.num_key_value_heads,
                ") must divide num_attention_heads (", c.num_attention_heads, ")");
  const int64_t default_head_dim = c.hidden_size / c.num_attention_heads;
  c.head_dim = get_number<int>(j, "head_dim", src, false, static_cast<int>(default_head_dim));
  QUILT_REQUIRE(c.head_dim > 0 && c.head_dim % 2 == 0, src, ": field 'head_dim' must be a positive even number, got ", c.head_dim);
  c.rms_norm_eps = get_number<float>(j, "rms_norm_eps", src, false, 1e-6f);
  QUILT_REQUIRE(c.rms_norm_eps > 0, src, ": field 'rms_norm_eps' must be positive");
  c.max_position_embeddings = get_number<int64_t>(j, "max_position_embeddings", src, false, 8192);

  // RoPE: rope_parameters (5.x) or top-level rope_theta (original); no scaling variants.
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    const bool default_type = it->is_object() && it->value("rope_type", it->value("type", "")) == "default";
    QUILT_REQUIRE(default_type, src, ": field 'rope_scaling' = ", it->dump(),
                  " is not supported (Quilt implements plain RoPE only)");
  }
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    QUILT_REQUIRE(it->is_object(), src, ": field 'rope_parameters' must be an object");
    const std::string type = it->value("rope_type", "default");
    QUILT_REQUIRE(type == "default", src, ": field 'rope_parameters.rope_type' is \"", type,
                  "\"; Quilt implements only \"default\" RoPE");
    c.rope_theta = get_number<float>(*it, "rope_theta", src + " rope_parameters", false, 10000.f);
  } else {
    c.rope_theta = get_number<float>(j, "rope_theta", src, false, 10000.f);
  }
  QUILT_REQUIRE(c.rope_theta > 0, src, ": rope_theta must be positive");

  // Activation: hidden_activation (5.x) wins; the original release's hidden_act "gelu" was
  // always run as the tanh approximation for Gemma.
  if (auto it = j.find("hidden_activation"); it != j.end() && !it->is_null()) {
    const std::string a = it->get<std::string>();
    QUILT_REQUIRE(a == "gelu_pytorch_tanh" || a == "gelu_new" || a == "gelu_tanh", src,
                  ": field 'hidden_activation' is \"", a,
                  "\"; Quilt implements Gemma's tanh-approximate GELU (gelu_pytorch_tanh)");
  } else if (auto it2 = j.find("hidden_act"); it2 != j.end() && !it2->is_null()) {
    const std::string a = it2->get<std::string>();
    QUILT_REQUIRE(a == "gelu" || a == "gelu_pytorch_tanh" || a == "gelu_new", src,
                  ": field 'hidden_act' is \"", a,
                  "\"; Quilt implements Gemma's tanh-approximate GELU");
  }

  if (auto it = j.find("tie_word_embeddings"); it != j.end() && !it->is_null())
    QUILT_REQUIRE(it->get<bool>(), src,
                  ": field 'tie_word_embeddings' is false; Quilt's Gemma ties lm_head to the embedding");
  if (auto it = j.find("attention_bias"); it != j.end() && !it->is_null())
    QUILT_REQUIRE(!it->get<bool>(), src, ": field 'attention_bias' is true; Gemma has no attention bias");
  if (auto it = j.find("sliding_window"); it != j.end() && !it->is_null())
    QUILT_FAIL(src, ": field 'sliding_window' is set; Quilt's Gemma attends to the whole context");

  if (auto it = j.find("dtype"); it != j.end() && it->is_string())
    c.dtype = parse_dtype(it->get<std::string>(), src, "dtype");
  else if (auto it2 = j.find("torch_dtype"); it2 != j.end() && it2->is_string())
    c.dtype = parse_dtype(it2->get<std::string>(), src, "torch_dtype");

  c.bos_token_id = get_number<int>(j, "bos_token_id", src, false, 2);
  c.pad_token_id = get_number<int>(j, "pad_token_id", src, false, 0);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    c.eos_token_ids.clear();
    if (it->is_array()) {
      for (const auto& e : *it) c.eos_token_ids.push_back(e.get<int>());
    } else {
      QUILT_REQUIRE(it->is_number_integer(), src, ": field 'eos_token_id' must be an integer or a list");
      c.eos_token_ids.push_back(it->get<int>());
    }
  }
  return c;
}

GemmaConfig GemmaConfig::from_file(const std::string& path) {
  std::ifstream in(path);
  QUILT_REQUIRE(in.good(), "cannot read model config '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_text(ss.str(), path);
}

std::string GemmaConfig::summary() const {
  std::ostringstream os;
  os << "gemma: " << num_hidden_layers << " layers, hidden " << hidden_size << ", heads "
     << num_attention_heads << " (kv " << num_key_value_heads << ", head_dim " << head_dim
     << "), intermediate " << intermediate_size << ", vocab " << vocab_size << ", rope_theta "
     << rope_theta << ", stored " << dtype_name(dtype);
  return os.str();
}

std::vector<int> load_eos_ids(const std::string& model_dir, const GemmaConfig& config) {
  std::vector<int> ids = config.eos_token_ids;
  const std::string path = model_dir + "/generation_config.json";
  std::ifstream in(path);
  if (!in.good()) return ids;
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    QUILT_FAIL(path, ": not valid JSON (", e.what(), ")");
  }
  auto add = [&](const json& v) {
    QUILT_REQUIRE(v.is_number_integer(), path, ": eos_token_id must be an integer or a list of integers");
    const int id = v.get<int>();
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  };
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      for (const auto& v : *it) add(v);
    } else {
      add(*it);
    }
  }
  return ids;
}

}  // namespace quilt
