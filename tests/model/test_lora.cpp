// PEFT LoRA adapters against the golden fixtures (Hugging Face transformers + PEFT, fp32): each
// adapter alone, and one batch mixing the base model with every adapter (different ranks), must
// give the reference prompt logprobs (1e-3) and greedy ids. Bad adapters are refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "model/gemma_model.h"
#include "model/greedy.h"
#include "model/lora_adapter.h"
#include "runtime/core/check.h"
#include "tests/model/batch_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;
namespace fs = std::filesystem;

namespace {
struct Loaded {
  GemmaConfig cfg;
  std::unique_ptr<Backend> be = make_backend("cpu");
  SoloCommunicator comm;
  std::unique_ptr<GemmaForCausalLM> model;
  std::map<std::string, LoraAdapterShard> adapters;
  explicit Loaded(const quilt::testing::Fixture& f) : cfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    model = std::make_unique<GemmaForCausalLM>(cfg, *be, comm, Checkpoint::open(f.dir));
    for (const auto& c : f.cases)
      if (c.adapter && !adapters.count(*c.adapter))
        adapters[*c.adapter] = model->load_adapter(HostLoraAdapter::load(f.dir + "/adapters/" + *c.adapter, *c.adapter, cfg));
  }
  const LoraAdapterShard* adapter(const quilt::testing::GoldenCase& c) const {
    return c.adapter ? &adapters.at(*c.adapter) : nullptr;
  }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const quilt::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Lora, ConfigScalesPerModuleWithPatterns) {
  const auto c = PeftLoraConfig::from_json_text(R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": true,
      "target_modules": ["o_proj", "down_proj"], "rank_pattern": {"down_proj": 6}, "alpha_pattern": {"down_proj": 3}})", "t");
  const auto [r_down, a_down] = c.rank_alpha("model.layers.1.mlp.down_proj");
  EXPECT_EQ(r_down, 6);
  EXPECT_DOUBLE_EQ(c.scale(r_down, a_down), 3 / std::sqrt(6.0));
  const auto [r_o, a_o] = c.rank_alpha("model.layers.1.self_attn.o_proj");
  EXPECT_EQ(r_o, 2);
  EXPECT_DOUBLE_EQ(c.scale(r_o, a_o), 4 / std::sqrt(2.0));
  const auto plain = PeftLoraConfig::from_json_text(R"({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})", "t");
  EXPECT_DOUBLE_EQ(plain.scale(8, 16), 2.0);
}

TEST(Lora, UnsupportedConfigsAreRefusedByName) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"r": 4, "target_modules": ["q_proj"], "use_dora": true})", "DoRA"},
      {R"({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})", "modules_to_save"},
      {R"({"r": 4, "target_modules": ["embed_tokens"]})", "embedding"},
      {R"({"r": 4, "target_modules": ["lm_head"]})", "lm_head"},
      {R"({"r": 4, "target_modules": ["dense"]})", "dense"},
      {R"({"r": 0, "target_modules": ["q_proj"]})", "r must be"},
      {R"({"r": 4})", "target_modules"},
      {R"({"peft_type": "IA3", "r": 4, "target_modules": ["q_proj"]})", "IA3"},
      {R"({"r": 4, "target_modules": ["q_proj"], "bias": "all"})", "bias"},
      {"{nope", "not valid JSON"},
  };
  for (const auto& [text, word] : cases) {
    const std::string err = error_of([&] { PeftLoraConfig::from_json_text(text, "adapter_config.json"); });
    EXPECT_NE(err.find(word), std::string::npos) << "'" << err << "' should name " << word;
  }
}

TEST(Lora, EachAdapterAloneMatchesPeft) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    Loaded m(f);
    double worst = 0;
    int n = 0;
    for (const auto& c : f.cases) {
      if (!c.adapter) continue;
      const GreedyResult r = greedy_generate(*m.model, c.prompt_ids, f.max_new_tokens, m.cfg.eos_token_ids, m.adapter(c));
      for (size_t i = 1; i < c.prompt_logprobs.size(); ++i) {
        const double d = std::abs(*r.prompt_logprobs[i] - *c.prompt_logprobs[i]);
        worst = std::max(worst, d);
        EXPECT_LE(d, 1e-3) << f.name << " " << *c.adapter << " token " << i;
      }
      EXPECT_EQ(r.greedy_ids, c.greedy_ids) << f.name << " " << *c.adapter;
      ++n;
    }
    EXPECT_EQ(n, 9);
    std::printf("[lora] %-24s max |logprob - PEFT| = %.3g over %d adapter cases\n", f.name.c_str(), worst, n);
  }
}

// One batch holds every case of a fixture: the base model and all three adapters (ranks 4, 8,
// 2/6), prefill then decode together.
TEST(Lora, MixedBatchOfBaseAndAdaptersMatchesEachAlone) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    Loaded m(f);
    const int64_t V = m.cfg.vocab_size;
    quilt::testing::BatchRunner run(*m.model, 256);
    std::vector<int> seq;
    std::vector<const LoraAdapterShard*> ad;
    std::vector<std::pair<int, int>> work;
    for (const auto& c : f.cases) {
      seq.push_back(run.add_sequence(c.prompt_ids));
      ad.push_back(m.adapter(c));
      work.push_back({seq.back(), static_cast<int>(c.prompt_ids.size())});
    }
    auto adapters_of = [&](const std::vector<std::pair<int, int>>& w) {
      AdapterData d;
      int row = 0;
      for (auto [s, n] : w) {
        if (ad[s]) d.segments.push_back({row, row + n, ad[s]});
        row += n;
      }
      return d;
    };
    auto rows = run.step(work, adapters_of(work));
    std::vector<std::vector<float>> last(f.cases.size());
    for (size_t k = 0; k < f.cases.size(); ++k) {
      const auto& c = f.cases[k];
      for (size_t i = 1; i < c.prompt_ids.size(); ++i)
        EXPECT_NEAR(token_logprob(rows[seq[k]].data() + (i - 1) * V, V, c.prompt_ids[i]), *c.prompt_logprobs[i], 1e-3)
            << f.name << " case " << k;
      last[k].assign(rows[seq[k]].end() - V, rows[seq[k]].end());
    }
    std::vector<std::vector<int>> got(f.cases.size());
    for (int step = 0; step < f.max_new_tokens; ++step) {
      std::vector<std::pair<int, int>> w;
      for (size_t k = 0; k < f.cases.size(); ++k) {
        if (got[k].size() >= f.cases[k].greedy_ids.size()) continue;
        got[k].push_back(argmax(last[k].data(), V));
        if (got[k].size() < f.cases[k].greedy_ids.size()) {
          run.append_token(seq[k], got[k].back());
          w.push_back({seq[k], 1});
        }
      }
      if (w.empty()) break;
      auto r = run.step(w, adapters_of(w));
      for (auto [s, n] : w) last[s] = r[s];
    }
    for (size_t k = 0; k < f.cases.size(); ++k)
      EXPECT_EQ(got[k], f.cases[k].greedy_ids) << f.name << " case " << k << " adapter "
                                               << f.cases[k].adapter.value_or("base");
  }
}

TEST(Lora, BadAdapterFilesAreRefusedByName) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  const auto& f = fixtures.front();
  const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
  const fs::path tmp = fs::temp_directory_path() / ("quilt_lora_" + std::to_string(::getpid()));
  const fs::path good = fs::path(f.dir) / "adapters" / "b-r8-all";
  auto fresh = [&] {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    fs::copy(good, tmp);
  };
  auto load_err = [&] { return error_of([&] { HostLoraAdapter::load(tmp.string(), "bad", cfg); }); };
  fresh();
  EXPECT_EQ(load_err(), "");
  fs::remove(tmp / "adapter_model.safetensors");
  EXPECT_NE(load_err().find("adapter_model.safetensors' is missing"), std::string::npos);
  fresh();
  fs::resize_file(tmp / "adapter_model.safetensors", fs::file_size(tmp / "adapter_model.safetensors") / 2);
  EXPECT_NE(load_err().find("truncated"), std::string::npos) << load_err();
  fresh();
  fs::remove(tmp / "adapter_config.json");
  EXPECT_NE(load_err().find("adapter_config.json' is missing"), std::string::npos);
  fresh();
  {  // a rank that does not match the tensors
    std::ifstream in(tmp / "adapter_config.json");
    std::string s((std::istreambuf_iterator<char>(in)), {});
    in.close();
    s.replace(s.find("\"r\": 8"), 6, "\"r\": 4");
    std::ofstream(tmp / "adapter_config.json") << s;
  }
  EXPECT_NE(load_err().find("lora_A has shape"), std::string::npos) << load_err();
  // an adapter made for another model (different hidden size)
  fresh();
  GemmaConfig other = cfg;
  other.hidden_size += 8;
  EXPECT_NE(error_of([&] { HostLoraAdapter::load(tmp.string(), "bad", other); }).find("has shape"), std::string::npos);
  EXPECT_NE(error_of([&] { HostLoraAdapter::load("/nonexistent/x", "gone", cfg); }).find("does not exist"), std::string::npos);
  fs::remove_all(tmp);
}
