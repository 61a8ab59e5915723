#include "model/lora_adapter.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <tuple>
#include <sstream>

#include "model/safetensors.h"
#include "runtime/core/check.h"

namespace quilt {
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const char* lora_target_name(LoraTarget t) {
  static const char* names[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names[static_cast<int>(t)];
}

namespace {
std::optional<LoraTarget> target_of(const std::string& proj) {
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (proj == lora_target_name(static_cast<LoraTarget>(t))) return static_cast<LoraTarget>(t);
  return std::nullopt;
}
std::string module_path(int layer, LoraTarget t) {
  const bool attn = t == LoraTarget::q || t == LoraTarget::k || t == LoraTarget::v || t == LoraTarget::o;
  return "model.layers." + std::to_string(layer) + (attn ? ".self_attn." : ".mlp.") + lora_target_name(t);
}
bool is_set(const ojson& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_array() || it->is_object() || it->is_string()) return !it->empty() && !(it->is_string() && it->get<std::string>().empty());
  return true;
}
// PEFT's get_pattern_key: the first key that matches the end of the module path.
template <typename V>
const V* pattern_lookup(const std::vector<std::pair<std::string, V>>& patterns, const std::string& path) {
  for (const auto& [key, v] : patterns) {
    try {
      if (std::regex_match(path, std::regex("(.*\\.)?(" + key + ")"))) return &v;
    } catch (const std::regex_error&) {
      if (path == key || (path.size() > key.size() && path.compare(path.size() - key.size() - 1, std::string::npos, "." + key) == 0)) return &v;
    }
  }
  return nullptr;
}
}  // namespace

PeftLoraConfig PeftLoraConfig::from_json_text(const std::string& text, const std::string& src) {
  ojson j;
  try {
    j = ojson::parse(text);
  } catch (const ojson::exception& e) {
    QUILT_FAIL(src, ": not valid JSON (", e.what(), ")");
  }
  QUILT_REQUIRE(j.is_object(), src, ": expected a JSON object");
  PeftLoraConfig c;
  if (j.contains("peft_type") && !j["peft_type"].is_null())
    QUILT_REQUIRE(j["peft_type"] == "LORA", src, ": peft_type ", j["peft_type"].dump(), " is not supported; Quilt serves LoRA adapters");
  QUILT_REQUIRE(!is_set(j, "use_dora"), src, ": use_dora is set; DoRA adapters are not supported");
  QUILT_REQUIRE(!is_set(j, "modules_to_save"), src, ": modules_to_save is set; adapters that replace whole modules are not supported");
  QUILT_REQUIRE(!is_set(j, "layers_to_transform") && !is_set(j, "layers_pattern"), src,
                ": layers_to_transform / layers_pattern are not supported");
  QUILT_REQUIRE(!is_set(j, "layer_replication"), src, ": layer_replication is not supported");
  QUILT_REQUIRE(!is_set(j, "trainable_token_indices"), src, ": trainable_token_indices is not supported");
  QUILT_REQUIRE(!is_set(j, "target_parameters"), src, ": target_parameters is not supported");
  QUILT_REQUIRE(!is_set(j, "lora_bias"), src, ": lora_bias is not supported");
  if (j.contains("bias") && j["bias"].is_string())
    QUILT_REQUIRE(j["bias"] == "none", src, ": bias \"", j["bias"].get<std::string>(), "\" is not supported (only \"none\")");
  QUILT_REQUIRE(j.contains("r") && j["r"].is_number_integer() && j["r"].get<int>() > 0, src, ": r must be a positive integer");
  c.r = j["r"].get<int>();
  c.lora_alpha = j.contains("lora_alpha") && j["lora_alpha"].is_number() ? j["lora_alpha"].get<double>() : c.r;
  c.use_rslora = j.value("use_rslora", false);
  c.fan_in_fan_out = j.value("fan_in_fan_out", false);
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string())
    c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  QUILT_REQUIRE(j.contains("target_modules") && !j["target_modules"].is_null(), src, ": target_modules is missing");
  if (j["target_modules"].is_string()) {
    c.target_modules.push_back(j["target_modules"].get<std::string>());
  } else {
    QUILT_REQUIRE(j["target_modules"].is_array(), src, ": target_modules must be a list or a string");
    for (const auto& t : j["target_modules"]) {
      QUILT_REQUIRE(t.is_string(), src, ": target_modules entries must be strings");
      const std::string name = t.get<std::string>();
      QUILT_REQUIRE(name != "embed_tokens" && name != "lm_head", src, ": target module '", name,
                    "': embedding and lm_head LoRA are not supported");
      QUILT_REQUIRE(target_of(name).has_value(), src, ": target module '", name,
                    "' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
      c.target_modules.push_back(name);
    }
  }
  auto read_patterns = [&](const char* key, auto& out) {
    if (!j.contains(key) || j[key].is_null()) return;
    QUILT_REQUIRE(j[key].is_object(), src, ": ", key, " must be an object");
    using V = typename std::decay_t<decltype(out)>::value_type::second_type;
    for (auto it = j[key].begin(); it != j[key].end(); ++it) {
      QUILT_REQUIRE(it.value().is_number(), src, ": ", key, " entry '", it.key(), "' must be a number");
      out.push_back({it.key(), it.value().template get<V>()});
    }
  };
  read_patterns("rank_pattern", c.rank_pattern);
  read_patterns("alpha_pattern", c.alpha_pattern);
  for (const auto& [k, r] : c.rank_pattern) QUILT_REQUIRE(r > 0, src, ": rank_pattern '", k, "' must be positive");
  return c;
}

std::pair<int, double> PeftLoraConfig::rank_alpha(const std::string& path) const {
  const int* r = pattern_lookup(rank_pattern, path);
  const double* a = pattern_lookup(alpha_pattern, path);
  return {r ? *r : this->r, a ? *a : lora_alpha};
}

double PeftLoraConfig::scale(int rank, double alpha) const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
}

size_t HostLoraAdapter::host_bytes() const {
  size_t n = 0;
  for (const auto& l : layers)
    for (const auto& m : l)
      if (m) n += (m->A.size() + m->B.size()) * sizeof(float);
  return n;
}

HostLoraAdapter HostLoraAdapter::load(const std::string& dir, const std::string& name, const GemmaConfig& base) {
  HostLoraAdapter a;
  a.name = name;
  a.dir = dir;
  const fs::path cfg_path = fs::path(dir) / "adapter_config.json";
  QUILT_REQUIRE(fs::is_directory(dir), "adapter '", name, "': folder '", dir, "' does not exist");
  QUILT_REQUIRE(fs::exists(cfg_path), "adapter '", name, "': '", cfg_path.string(), "' is missing");
  {
    std::ifstream in(cfg_path);
    std::stringstream ss;
    ss << in.rdbuf();
    a.config = PeftLoraConfig::from_json_text(ss.str(), "adapter '" + name + "': " + cfg_path.string());
  }
  const fs::path st = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::exists(st)) {
    QUILT_REQUIRE(!fs::exists(fs::path(dir) / "adapter_model.bin"), "adapter '", name,
                  "': only adapter_model.bin (a pickle) is present; Quilt reads adapter_model.safetensors");
    QUILT_FAIL("adapter '", name, "': '", st.string(), "' is missing");
  }
  std::unique_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::open(st.string());
  } catch (const Error& e) {
    QUILT_FAIL("adapter '", name, "': ", e.what());
  }
  const int64_t H = base.hidden_size, D = base.head_dim, I = base.intermediate_size;
  const int64_t Hq = base.num_attention_heads * D, Hkv = base.num_key_value_heads * D;
  auto dims = [&](LoraTarget t) -> std::pair<int64_t, int64_t> {  // (in, out)
    switch (t) {
      case LoraTarget::q: return {H, Hq};
      case LoraTarget::k: case LoraTarget::v: return {H, Hkv};
      case LoraTarget::o: return {Hq, H};
      case LoraTarget::gate: case LoraTarget::up: return {H, I};
      case LoraTarget::down: return {I, H};
    }
    return {0, 0};
  };
  a.layers.resize(base.num_hidden_layers);
  static const std::regex key_re(
      R"(^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)(\.default)?\.weight$)");
  std::map<std::pair<int, int>, std::pair<const TensorInfo*, const TensorInfo*>> found;
  for (const auto& [key, t] : file->tensors()) {
    std::smatch m;
    QUILT_REQUIRE(std::regex_match(key, m, key_re), "adapter '", name, "': tensor '", key,
                  "' is not a LoRA A/B weight of a Gemma projection (embedding, lm_head, DoRA and bias weights are not supported)");
    const int layer = std::stoi(m[1]);
    const auto target = target_of(m[3]);
    QUILT_REQUIRE(target, "adapter '", name, "': tensor '", key, "' targets an unsupported module '", m[3].str(), "'");
    QUILT_REQUIRE(layer < base.num_hidden_layers, "adapter '", name, "': tensor '", key, "' is for layer ", layer,
                  " but the base model has ", base.num_hidden_layers);
    auto& slot = found[{layer, static_cast<int>(*target)}];
    (m[4] == "A" ? slot.first : slot.second) = &t;
  }
  QUILT_REQUIRE(!found.empty(), "adapter '", name, "': '", st.string(), "' holds no LoRA weights");
  for (const auto& [lt, ab] : found) {
    const auto [layer, ti] = lt;
    const LoraTarget target = static_cast<LoraTarget>(ti);
    const std::string path = module_path(layer, target);
    QUILT_REQUIRE(ab.first && ab.second, "adapter '", name, "': ", path, " has only one of lora_A / lora_B");
    const auto [rank, alpha] = a.config.rank_alpha(path);
    const auto [in, out] = dims(target);
    const TensorInfo& A = *ab.first;
    const TensorInfo& B = *ab.second;
    QUILT_REQUIRE(A.shape == std::vector<int64_t>({rank, in}), "adapter '", name, "': ", path, ".lora_A has shape ",
                  A.shape_str(), " but rank ", rank, " and the base model need [", rank, ", ", in, "]");
    QUILT_REQUIRE(B.shape == std::vector<int64_t>({out, rank}), "adapter '", name, "': ", path, ".lora_B has shape ",
                  B.shape_str(), " but the base model and rank ", rank, " need [", out, ", ", rank, "]");
    HostLoraModule mod;
    mod.rank = rank;
    mod.scale = static_cast<float>(a.config.scale(rank, alpha));
    mod.in = in;
    mod.out = out;
    mod.A.resize(static_cast<size_t>(rank * in));
    mod.B.resize(static_cast<size_t>(out * rank));
    convert_to_f32(mod.A.data(), A.data, A.dtype, mod.A.size());
    convert_to_f32(mod.B.data(), B.data, B.dtype, mod.B.size());
    for (float& b : mod.B) b *= mod.scale;
    for (float v : mod.A) QUILT_REQUIRE(std::isfinite(v), "adapter '", name, "': ", path, ".lora_A holds a non-finite value");
    for (float v : mod.B) QUILT_REQUIRE(std::isfinite(v), "adapter '", name, "': ", path, ".lora_B holds a non-finite value");
    a.max_rank = std::max(a.max_rank, rank);
    a.layers[layer][ti] = std::move(mod);
  }
  return a;
}

std::pair<int64_t, int64_t> lora_local_dims(LoraTarget t, const GemmaConfig& c, const TpLayout& tp) {
  const int64_t H = c.hidden_size, D = c.head_dim;
  switch (t) {
    case LoraTarget::q: return {H, tp.q_heads * D};
    case LoraTarget::k: case LoraTarget::v: return {H, tp.kv_heads * D};
    case LoraTarget::o: return {tp.q_heads * D, H};
    case LoraTarget::gate: case LoraTarget::up: return {H, tp.intermediate};
    case LoraTarget::down: return {tp.intermediate, H};
  }
  return {0, 0};
}

HostModuleShard shard_lora_module(const HostLoraModule& m, LoraTarget t, const GemmaConfig& c, const TpLayout& tp) {
  const int64_t D = c.head_dim, r = m.rank;
  HostModuleShard s;
  s.rank = m.rank;
  std::tie(s.in, s.out) = lora_local_dims(t, c, tp);
  auto rows_of_B = [&](int64_t r0) { s.B.assign(m.B.begin() + r0 * r, m.B.begin() + (r0 + s.out) * r); };
  auto cols_of_A = [&](int64_t c0) {
    s.A.resize(static_cast<size_t>(r * s.in));
    for (int64_t i = 0; i < r; ++i) std::copy_n(m.A.data() + i * m.in + c0, s.in, s.A.data() + i * s.in);
  };
  switch (t) {
    case LoraTarget::q: s.A = m.A; rows_of_B(tp.q_head_begin * D); break;
    case LoraTarget::k: case LoraTarget::v: s.A = m.A; rows_of_B(tp.kv_head_begin * D); break;
    case LoraTarget::gate: case LoraTarget::up: s.A = m.A; rows_of_B(tp.intermediate_begin); break;
    case LoraTarget::o: cols_of_A(tp.q_head_begin * D); s.B = m.B; break;
    case LoraTarget::down: cols_of_A(tp.intermediate_begin); s.B = m.B; break;
  }
  return s;
}

LoraAdapterShard shard_lora_adapter(const HostLoraAdapter& a, const GemmaConfig& c, const TpLayout& tp, Backend& be) {
  LoraAdapterShard s;
  s.name = a.name;
  s.layers.resize(a.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    for (int ti = 0; ti < kNumLoraTargets; ++ti) {
      const auto& m = a.layers[l][ti];
      if (!m) continue;
      const HostModuleShard h = shard_lora_module(*m, static_cast<LoraTarget>(ti), c, tp);
      LoraModuleShard out;
      out.rank = h.rank;
      out.A = be.from_host(h.A.data(), DType::f32, {h.rank, h.in});
      out.B = be.from_host(h.B.data(), DType::f32, {h.out, h.rank});
      s.device_bytes += out.A.bytes() + out.B.bytes();
      s.layers[l][ti] = std::move(out);
    }
  }
  return s;
}

}  // namespace quilt
