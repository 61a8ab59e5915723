#include "launch/init_model.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "launch/embedded_model.h"
#include "quilt/kernels/dtype.h"
#include "runtime/core/check.h"

namespace quilt {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {
// The tiny model's shapes: MQA like gemma-2b, small enough to run anywhere.
constexpr int kHidden = 64, kLayers = 2, kHeads = 4, kKvHeads = 1, kHeadDim = 16, kInter = 128;

struct Writer {  // one safetensors file, tensors in insertion order
  json header = json::object();
  std::vector<char> data;
  void add(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& v, DType dt) {
    const size_t begin = data.size();
    if (dt == DType::bf16) {
      for (float f : v) {
        const uint16_t h = f32_to_bf16(f);
        data.push_back(static_cast<char>(h & 0xff));
        data.push_back(static_cast<char>(h >> 8));
      }
    } else {
      const char* p = reinterpret_cast<const char*>(v.data());
      data.insert(data.end(), p, p + v.size() * 4);
    }
    header[name] = {{"dtype", dt == DType::bf16 ? "BF16" : "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
  }
  void write(const fs::path& path) {
    std::string h = header.dump();
    while (h.size() % 8) h += ' ';
    std::ofstream out(path, std::ios::binary);
    const uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    QUILT_REQUIRE(out.good(), "cannot write '", path.string(), "'");
  }
};

std::vector<float> normal(std::mt19937_64& rng, size_t n, float std) {
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

void write_json(const fs::path& p, const json& j) {
  std::ofstream out(p);
  out << j.dump(2) << "\n";
  QUILT_REQUIRE(out.good(), "cannot write '", p.string(), "'");
}

void write_adapter(const fs::path& dir, std::mt19937_64& rng, int r, double alpha, const std::vector<std::string>& targets,
                   int vocab_unused) {
  (void)vocab_unused;
  fs::create_directories(dir);
  write_json(dir / "adapter_config.json",
             json{{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"r", r}, {"lora_alpha", alpha},
                  {"lora_dropout", 0.0}, {"bias", "none"}, {"use_rslora", false}, {"use_dora", false},
                  {"fan_in_fan_out", false}, {"target_modules", targets}, {"base_model_name_or_path", "quilt-tiny-random"}});
  Writer w;
  const int Hq = kHeads * kHeadDim, Hkv = kKvHeads * kHeadDim;
  for (int l = 0; l < kLayers; ++l)
    for (const auto& t : targets) {
      int64_t in = kHidden, out = kHidden;
      if (t == "q_proj") out = Hq;
      if (t == "k_proj" || t == "v_proj") out = Hkv;
      if (t == "o_proj") in = Hq;
      if (t == "gate_proj" || t == "up_proj") out = kInter;
      if (t == "down_proj") in = kInter;
      const std::string base = "base_model.model.model.layers." + std::to_string(l) +
                               (t == "q_proj" || t == "k_proj" || t == "v_proj" || t == "o_proj" ? ".self_attn." : ".mlp.") + t;
      w.add(base + ".lora_A.weight", {r, in}, normal(rng, static_cast<size_t>(r * in), 0.2f), DType::f32);
      w.add(base + ".lora_B.weight", {out, r}, normal(rng, static_cast<size_t>(out * r), 0.2f), DType::f32);
    }
  w.write(dir / "adapter_model.safetensors");
}
}  // namespace

void write_tiny_model(const std::string& dir_s, uint64_t seed) {
  const fs::path dir(dir_s);
  fs::create_directories(dir);
  int vocab = 0;
  for (const auto& f : embedded_model_files()) {
    std::ofstream out(dir / f.name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(f.data), static_cast<std::streamsize>(f.size));
    QUILT_REQUIRE(out.good(), "cannot write '", (dir / f.name).string(), "'");
  }
  vocab = 512;  // the embedded tokenizer's piece count
  write_json(dir / "config.json",
             json{{"architectures", {"GemmaForCausalLM"}}, {"model_type", "gemma"}, {"vocab_size", vocab},
                  {"hidden_size", kHidden}, {"intermediate_size", kInter}, {"num_hidden_layers", kLayers},
                  {"num_attention_heads", kHeads}, {"num_key_value_heads", kKvHeads}, {"head_dim", kHeadDim},
                  {"rms_norm_eps", 1e-6}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 10000.0}}},
                  {"hidden_activation", "gelu_pytorch_tanh"}, {"max_position_embeddings", 2048}, {"dtype", "bfloat16"},
                  {"bos_token_id", 2}, {"eos_token_id", 1}, {"pad_token_id", 0}, {"tie_word_embeddings", true},
                  {"quilt_note", "random weights (quilt init-model --seed " + std::to_string(seed) + "): for trying the API only"}});
  write_json(dir / "generation_config.json", json{{"bos_token_id", 2}, {"eos_token_id", 1}, {"pad_token_id", 0}});
  std::mt19937_64 rng(seed);
  Writer w;
  const int Hq = kHeads * kHeadDim, Hkv = kKvHeads * kHeadDim;
  w.add("model.embed_tokens.weight", {vocab, kHidden}, normal(rng, static_cast<size_t>(vocab) * kHidden, 0.35f), DType::bf16);
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.add(p + "input_layernorm.weight", {kHidden}, normal(rng, kHidden, 0.1f), DType::bf16);
    w.add(p + "post_attention_layernorm.weight", {kHidden}, normal(rng, kHidden, 0.1f), DType::bf16);
    w.add(p + "self_attn.q_proj.weight", {Hq, kHidden}, normal(rng, Hq * kHidden, 0.25f), DType::bf16);
    w.add(p + "self_attn.k_proj.weight", {Hkv, kHidden}, normal(rng, Hkv * kHidden, 0.25f), DType::bf16);
    w.add(p + "self_attn.v_proj.weight", {Hkv, kHidden}, normal(rng, Hkv * kHidden, 0.25f), DType::bf16);
    w.add(p + "self_attn.o_proj.weight", {kHidden, Hq}, normal(rng, kHidden * Hq, 0.25f), DType::bf16);
    w.add(p + "mlp.gate_proj.weight", {kInter, kHidden}, normal(rng, kInter * kHidden, 0.25f), DType::bf16);
    w.add(p + "mlp.up_proj.weight", {kInter, kHidden}, normal(rng, kInter * kHidden, 0.25f), DType::bf16);
    w.add(p + "mlp.down_proj.weight", {kHidden, kInter}, normal(rng, kHidden * kInter, 0.25f), DType::bf16);
  }
  w.add("model.norm.weight", {kHidden}, normal(rng, kHidden, 0.1f), DType::bf16);
  w.write(dir / "model.safetensors");
  write_adapter(dir / "adapters" / "demo-qv-r4", rng, 4, 8, {"q_proj", "v_proj"}, vocab);
  write_adapter(dir / "adapters" / "demo-all-r8", rng, 8, 16,
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, vocab);
}

std::string default_model_dir(uint64_t seed) {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  const fs::path cache = xdg && *xdg ? fs::path(xdg) : fs::path(home ? home : "/tmp") / ".cache";
  const fs::path dir = cache / "quilt" / ("tiny-gemma-seed" + std::to_string(seed));
  if (fs::exists(dir / "model.safetensors") && fs::exists(dir / "adapters" / "demo-all-r8" / "adapter_model.safetensors"))
    return dir.string();
  // Write beside it and rename, so that ranks starting together never see half a checkpoint.
  const fs::path tmp = cache / "quilt" / ("tmp-" + std::to_string(::getpid()) + "-" + std::to_string(seed));
  write_tiny_model(tmp.string(), seed);
  std::error_code ec;
  fs::rename(tmp, dir, ec);
  if (ec) fs::remove_all(tmp, ec);  // another rank won the race: use its copy
  QUILT_REQUIRE(fs::exists(dir / "model.safetensors"), "cannot create the default model in '", dir.string(), "'");
  return dir.string();
}

}  // namespace quilt
