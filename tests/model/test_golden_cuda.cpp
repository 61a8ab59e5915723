// The whole model on the GPU against Hugging Face transformers (fp32) on the golden fixtures,
// one prompt at a time and in mixed batches (chunked prefill beside prefill, then decode).
// Without a visible GPU every test is skipped, never passed.
//
//  - f32 mode: the CPU's bar. Prompt and greedy logprobs within 1e-3 of HF, greedy ids identical.
//  - bf16 mode: weights, activations and the KV cache are bf16 (8-bit significand: up to
//    2^-8 = 0.39% relative per rounding), and weights stored in f32 or f16 lose bits on load. These tiny
//    random models (init std 0.25-0.35 at hidden 48-64) amplify such errors layer by layer.
//    Measured on an H100 (launch/experiments/cuda-stage1.md): worst prompt-logprob difference
//    0.235 and worst last-prompt-logit difference 0.24 (both on gqa-f32-new, whose f32
//    weights lose the most on load). Hugging Face's own bf16 run of the same checkpoints on
//    the same GPU (launch/experiments/hf_bf16_error.py) is off by 0.22 (sdpa) to 0.32 (eager)
//    in prompt logprobs and 0.27 to 0.42 in logits. kBf16LogprobTol and kBf16LogitTol = 0.4
//    leave ~1.7x headroom over ours; a logic error shows up as whole nats, and the f32 mode
//    above checks the same kernels to 1e-3. Greedy ids are compared step by step while
//    HF's margin (top-1 minus top-2 logit, expected.json's greedy_margins) exceeds
//    kBf16MarginTol = 2 x kBf16LogitTol, the most a pair of logits can move against each other;
//    at the first step with a smaller margin a different id is allowed, and that case's
//    comparison stops there.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <nlohmann/json.hpp>

#include "kernels/cuda/cuda_backend.h"
#include "model/gemma_model.h"
#include "model/greedy.h"
#include "runtime/core/check.h"
#include "tests/model/batch_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;
using quilt::testing::BatchRunner;
using quilt::testing::Fixture;
using quilt::testing::GoldenCase;

namespace {

constexpr double kF32LogprobTol = 1e-3;
constexpr double kBf16LogprobTol = 0.4;
constexpr double kBf16LogitTol = 0.4;
constexpr double kBf16MarginTol = 2 * kBf16LogitTol;

struct Mode {
  DType dtype;
  double logprob_tol, logit_tol, margin_tol;  // margin_tol 0: every greedy id must match
};

Mode mode_of(DType dt) {
  if (dt == DType::f32) return {dt, kF32LogprobTol, kF32LogprobTol, 0.0};
  return {dt, kBf16LogprobTol, kBf16LogitTol, kBf16MarginTol};
}

// expected.json's greedy_margins of the base cases, by prompt (fixtures.h does not load them).
std::map<std::string, std::vector<double>> greedy_margins(const Fixture& f) {
  std::ifstream in(f.dir + "/expected.json");
  const auto j = nlohmann::json::parse(in);
  std::map<std::string, std::vector<double>> out;
  for (const auto& c : j.at("cases"))
    if (c.at("adapter").is_null() && c.contains("greedy_margins"))
      out[c.at("prompt").get<std::string>()] = c.at("greedy_margins").get<std::vector<double>>();
  return out;
}

// Compares greedy ids under the margin rule; returns how many steps were compared.
size_t compare_greedy(const std::vector<int>& got, const GoldenCase& c, const std::vector<double>& margins,
                      const Mode& m, const std::string& where) {
  size_t i = 0;
  for (; i < c.greedy_ids.size(); ++i) {
    if (i < got.size() && got[i] == c.greedy_ids[i]) continue;
    const double margin = i < margins.size() ? margins[i] : 0.0;
    const bool allowed = m.margin_tol > 0 && margin <= m.margin_tol;
    EXPECT_TRUE(allowed) << where << ": greedy id " << i << " is "
                         << (i < got.size() ? std::to_string(got[i]) : "missing") << ", HF "
                         << c.greedy_ids[i] << " with a margin of " << margin << " (tolerance "
                         << m.margin_tol << ")";
    break;
  }
  return i;
}

struct Loaded {
  GemmaConfig cfg;
  std::unique_ptr<Backend> be;
  SoloCommunicator comm;
  std::unique_ptr<GemmaForCausalLM> model;
  Loaded(const Fixture& f, DType dt) : cfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    be = make_backend("cuda", BackendOptions{dt});
    model = std::make_unique<GemmaForCausalLM>(cfg, *be, comm, Checkpoint::open(f.dir));
  }
};

class GoldenCuda : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the model was not run on the GPU";
  }
};

std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return dtype_name(info.param); }

}  // namespace

TEST_P(GoldenCuda, OnePromptAtATime) {
  const Mode m = mode_of(GetParam());
  double worst_all = 0;
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded l(f, m.dtype);
    const auto margins = greedy_margins(f);
    double worst_prompt = 0, worst_greedy = 0, worst_logit = 0;
    size_t compared = 0, total = 0;
    for (const auto* c : f.base_cases()) {
      const std::string where = f.name + " '" + c->prompt + "'";
      const GreedyResult r = greedy_generate(*l.model, c->prompt_ids, f.max_new_tokens, l.cfg.eos_token_ids);
      ASSERT_EQ(r.prompt_logprobs.size(), c->prompt_logprobs.size());
      for (size_t i = 1; i < c->prompt_logprobs.size(); ++i) {
        const double d = std::abs(*r.prompt_logprobs[i] - *c->prompt_logprobs[i]);
        worst_prompt = std::max(worst_prompt, d);
        EXPECT_LE(d, m.logprob_tol) << where << " prompt token " << i;
      }
      for (size_t v = 0; v < std::min(c->last_logits.size(), r.last_prompt_logits.size()); ++v) {
        const double d = std::abs(r.last_prompt_logits[v] - c->last_logits[v]);
        worst_logit = std::max(worst_logit, d);
        // expected.json keeps 6 significant digits of these
        EXPECT_LE(d, m.logit_tol + 1e-5 * std::abs(c->last_logits[v])) << where << " last-prompt logit " << v;
      }
      const auto it = margins.find(c->prompt);
      const size_t n = compare_greedy(r.greedy_ids, *c, it == margins.end() ? std::vector<double>{} : it->second, m, where);
      compared += n;
      total += c->greedy_ids.size();
      for (size_t i = 0; i < std::min(n, r.greedy_logprobs.size()); ++i) {
        const double d = std::abs(r.greedy_logprobs[i] - c->greedy_logprobs[i]);
        worst_greedy = std::max(worst_greedy, d);
        EXPECT_LE(d, m.logprob_tol) << where << " greedy token " << i;
      }
    }
    worst_all = std::max({worst_all, worst_prompt, worst_greedy});
    std::printf("[golden-cuda] %-5s %-22s max |logprob - HF|: prompt %.3g, greedy %.3g; max |last logit - HF| %.3g;"
                " greedy ids compared %zu/%zu\n",
                dtype_name(m.dtype), f.name.c_str(), worst_prompt, worst_greedy, worst_logit, compared, total);
  }
  std::printf("[golden-cuda] %-5s worst |logprob - HF| over all fixtures: %.3g (tolerance %.3g)\n",
              dtype_name(m.dtype), worst_all, m.logprob_tol);
}

// The batched path: the first half of prompt 0 beside the whole of prompt 1, then the rest of
// prompt 0 beside the other prompts, then decode steps for every sequence together, over blocks
// handed out in reverse order (tests/model/batch_runner.h).
TEST_P(GoldenCuda, MixedPrefillChunksAndDecodeInOneBatch) {
  const Mode m = mode_of(GetParam());
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded l(f, m.dtype);
    const auto margins = greedy_margins(f);
    const int64_t V = l.cfg.vocab_size;
    const auto cases = f.base_cases();
    ASSERT_GE(cases.size(), 2u);
    BatchRunner run(*l.model, 64);
    std::vector<int> seq;
    std::vector<std::vector<float>> prompt_rows(cases.size());
    for (const auto* c : cases) seq.push_back(run.add_sequence(c->prompt_ids));
    const int n0 = static_cast<int>(cases[0]->prompt_ids.size());
    const int first_chunk = std::max(1, n0 / 2);
    auto r1 = run.step({{seq[0], first_chunk}, {seq[1], static_cast<int>(cases[1]->prompt_ids.size())}});
    prompt_rows[0] = r1[seq[0]];
    prompt_rows[1] = r1[seq[1]];
    std::vector<std::pair<int, int>> w2{{seq[0], n0 - first_chunk}};
    for (size_t k = 2; k < cases.size(); ++k) w2.push_back({seq[k], static_cast<int>(cases[k]->prompt_ids.size())});
    auto r2 = run.step(w2);
    prompt_rows[0].insert(prompt_rows[0].end(), r2[seq[0]].begin(), r2[seq[0]].end());
    for (size_t k = 2; k < cases.size(); ++k) prompt_rows[k] = r2[seq[k]];

    double worst = 0;
    std::vector<std::vector<float>> last(cases.size());
    for (size_t k = 0; k < cases.size(); ++k) {
      const auto& ids = cases[k]->prompt_ids;
      for (size_t i = 1; i < ids.size(); ++i) {
        const double lp = token_logprob(prompt_rows[k].data() + (i - 1) * V, V, ids[i]);
        worst = std::max(worst, std::abs(lp - *cases[k]->prompt_logprobs[i]));
        EXPECT_NEAR(lp, *cases[k]->prompt_logprobs[i], m.logprob_tol) << f.name << " seq " << k << " token " << i;
      }
      last[k].assign(prompt_rows[k].end() - V, prompt_rows[k].end());
    }
    // Decode every sequence together; a sequence stops at its golden length or, in bf16, at the
    // first step where it may legitimately leave HF's path.
    std::vector<std::vector<int>> got(cases.size());
    std::vector<bool> live(cases.size(), true);
    for (int step = 0; step < f.max_new_tokens; ++step) {
      std::vector<std::pair<int, int>> work;
      for (size_t k = 0; k < cases.size(); ++k) {
        if (!live[k]) continue;
        const int next = argmax(last[k].data(), V);
        got[k].push_back(next);
        if (got[k].size() >= cases[k]->greedy_ids.size() || next != cases[k]->greedy_ids[got[k].size() - 1]) {
          live[k] = false;
          continue;
        }
        run.append_token(seq[k], next);
        work.push_back({seq[k], 1});
      }
      if (work.empty()) break;
      auto r = run.step(work);
      for (size_t k = 0; k < cases.size(); ++k)
        if (live[k]) last[k] = r[seq[k]];
    }
    size_t compared = 0, total = 0;
    for (size_t k = 0; k < cases.size(); ++k) {
      const auto it = margins.find(cases[k]->prompt);
      compared += compare_greedy(got[k], *cases[k], it == margins.end() ? std::vector<double>{} : it->second, m,
                                 f.name + " batched seq " + std::to_string(k));
      total += cases[k]->greedy_ids.size();
    }
    std::printf("[golden-cuda] %-5s %-22s batched: max |prompt logprob - HF| %.3g; greedy ids compared %zu/%zu\n",
                dtype_name(m.dtype), f.name.c_str(), worst, compared, total);
  }
}

// Decode steps replayed from CUDA graphs against the same steps run op by op, on two copies of
// the model fed identical batches: every sequence's prompt, then decode steps over batch sizes
// that need padding (3 rows in the bucket of 4, then 2, then 1), across KV block boundaries
// (the block-table width bucket changes), and again after an eager prefill in between.
// The graph pads rows and so changes the GEMMs' M, which may change cuBLAS's kernel: f32 logits
// agree to 1e-4 absolute (fp32 summation order only); bf16 to 0.05 + 1% of the logit (a few
// bf16 roundings of difference compounded over the tiny models' layers; a wrong row, position
// or cache slot moves logits by whole units). Greedy ids must be identical.
TEST_P(GoldenCuda, DecodeGraphsMatchEagerSteps) {
  const DType dt = GetParam();
  const double abs_tol = dt == DType::f32 ? 1e-4 : 0.05, rel_tol = dt == DType::f32 ? 0 : 0.01;
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded eager(f, dt), graph(f, dt);
    graph.model->set_decode_graphs(8);
    const int64_t V = eager.cfg.vocab_size;
    const auto cases = f.base_cases();
    BatchRunner re(*eager.model, 128, 4), rg(*graph.model, 128, 4);  // block_size 4: boundaries come often
    std::vector<int> seq;
    std::vector<std::vector<float>> last(cases.size());
    std::vector<std::pair<int, int>> prompts;
    for (const auto* c : cases) {
      seq.push_back(re.add_sequence(c->prompt_ids));
      rg.add_sequence(c->prompt_ids);
      prompts.push_back({seq.back(), static_cast<int>(c->prompt_ids.size())});
    }
    double worst = 0;
    int replayed = 0, steps = 0;
    auto compare = [&](const std::map<int, std::vector<float>>& a, const std::map<int, std::vector<float>>& b,
                       const std::string& where) {
      for (const auto& [s, rows] : a) {
        const auto& other = b.at(s);
        ASSERT_EQ(rows.size(), other.size());
        for (size_t i = 0; i < rows.size(); ++i) {
          const double d = std::abs(rows[i] - other[i]);
          worst = std::max(worst, d);
          ASSERT_LE(d, abs_tol + rel_tol * std::abs(rows[i])) << f.name << " " << where << " seq " << s << " logit " << i;
        }
        ASSERT_EQ(argmax(rows.data() + rows.size() - V, V), argmax(other.data() + other.size() - V, V))
            << f.name << " " << where << " seq " << s;
      }
    };
    {
      auto a = re.step(prompts), b = rg.step(prompts);
      compare(a, b, "prompts");
      for (size_t k = 0; k < cases.size(); ++k) last[k].assign(a[seq[k]].end() - V, a[seq[k]].end());
    }
    // Batch sizes per phase: all sequences, then fewer (padding inside smaller buckets).
    const int n = static_cast<int>(cases.size());
    const std::vector<int> widths{n, n, n, n, n, n, std::max(1, n - 1), std::max(1, n - 1), 1, 1, 1, n, n};
    for (size_t st = 0; st < widths.size(); ++st) {
      std::vector<std::pair<int, int>> work;
      for (int k = 0; k < widths[st]; ++k) {
        const int next = argmax(last[k].data(), V);
        re.append_token(seq[k], next);
        rg.append_token(seq[k], next);
        work.push_back({seq[k], 1});
      }
      auto a = re.step(work), b = rg.step(work);
      compare(a, b, "decode step " + std::to_string(st));
      ++steps;
      replayed += graph.model->last_forward_replayed_graph() ? 1 : 0;
      EXPECT_FALSE(eager.model->last_forward_replayed_graph());
      for (auto [s, one] : work) last[s].assign(a[s].end() - V, a[s].end());
    }
    // Most steps replay (a bucket's first step, or the first after a new table width, records).
    EXPECT_GE(replayed, steps / 3) << f.name;
    std::printf("[golden-cuda] %-5s %-22s graphs vs eager: %d of %d decode steps replayed, max |logit diff| %.3g\n",
                dtype_name(dt), f.name.c_str(), replayed, steps, worst);
  }
}

// LoRA decode steps replayed from CUDA graphs against the same steps run op by op, on two copies
// of the model with the fixture's PEFT adapters (ranks 4 on q/v, 8 on all modules, 2/6 rsLoRA):
// every case of the fixture in one batch (the base model's and each adapter's), the prompts
// (eager on both; prompt logprobs against PEFT), then decode steps over changing subsets and
// orders of the sequences, so that the adapter mix and each adapter's rows change from step to
// step while the graph recorded for the bucket replays (the mix is data: lora_plan.h).
// Tolerances as DecodeGraphsMatchEagerSteps (the LoRA kernels give the same bits in both, the
// padded base GEMMs may not); greedy ids must be identical.
TEST_P(GoldenCuda, LoraDecodeGraphsMatchEagerSteps) {
  const DType dt = GetParam();
  const Mode m = mode_of(dt);
  const double abs_tol = dt == DType::f32 ? 1e-4 : 0.05, rel_tol = dt == DType::f32 ? 0 : 0.01;
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded eager(f, dt), graph(f, dt);
    graph.model->set_decode_graphs(16);
    const int64_t V = eager.cfg.vocab_size;
    std::map<std::string, LoraAdapterShard> ad_e, ad_g;
    for (const auto& c : f.cases)
      if (c.adapter && !ad_e.count(*c.adapter)) {
        const HostLoraAdapter host = HostLoraAdapter::load(f.dir + "/adapters/" + *c.adapter, *c.adapter, eager.cfg);
        ad_e[*c.adapter] = eager.model->load_adapter(host);
        ad_g[*c.adapter] = graph.model->load_adapter(host);
      }
    const int n = static_cast<int>(f.cases.size());
    ASSERT_LE(n, 16) << f.name;
    BatchRunner re(*eager.model, 512, 4), rg(*graph.model, 512, 4);
    for (const auto& c : f.cases) {
      re.add_sequence(c.prompt_ids);
      rg.add_sequence(c.prompt_ids);
    }
    auto adapters_of = [&](const std::vector<std::pair<int, int>>& w, std::map<std::string, LoraAdapterShard>& ad) {
      AdapterData d;
      int row = 0;
      for (auto [s, cnt] : w) {
        if (f.cases[s].adapter) d.segments.push_back({row, row + cnt, &ad.at(*f.cases[s].adapter)});
        row += cnt;
      }
      return d;
    };
    double worst = 0, worst_peft = 0;
    auto compare = [&](const std::map<int, std::vector<float>>& a, const std::map<int, std::vector<float>>& b,
                       const std::string& where) {
      for (const auto& [s, rows] : a) {
        const auto& other = b.at(s);
        ASSERT_EQ(rows.size(), other.size());
        for (size_t i = 0; i < rows.size(); ++i) {
          const double d = std::abs(rows[i] - other[i]);
          worst = std::max(worst, d);
          ASSERT_LE(d, abs_tol + rel_tol * std::abs(rows[i]))
              << f.name << " " << where << " seq " << s << " (" << f.cases[s].adapter.value_or("base") << ") logit " << i;
        }
        ASSERT_EQ(argmax(rows.data() + rows.size() - V, V), argmax(other.data() + other.size() - V, V))
            << f.name << " " << where << " seq " << s;
      }
    };
    std::vector<std::vector<float>> last(n);
    {
      std::vector<std::pair<int, int>> prompts;
      for (int k = 0; k < n; ++k) prompts.push_back({k, static_cast<int>(f.cases[k].prompt_ids.size())});
      auto a = re.step(prompts, adapters_of(prompts, ad_e)), b = rg.step(prompts, adapters_of(prompts, ad_g));
      compare(a, b, "prompts");
      // Against PEFT: f32 to the CPU's bar; bf16 adapter cases (not measured on a GPU before) to
      // twice the base cases' tolerance: a wrong LoRA term moves logprobs by whole nats.
      for (int k = 0; k < n; ++k) {
        const auto& c = f.cases[k];
        const double tol = c.adapter && dt != DType::f32 ? 2 * m.logprob_tol : m.logprob_tol;
        for (size_t i = 1; i < c.prompt_ids.size(); ++i) {
          const double d = std::abs(token_logprob(a[k].data() + (i - 1) * V, V, c.prompt_ids[i]) - *c.prompt_logprobs[i]);
          worst_peft = std::max(worst_peft, d);
          EXPECT_LE(d, tol) << f.name << " case " << k << " (" << c.adapter.value_or("base") << ") token " << i;
        }
        last[k].assign(a[k].end() - V, a[k].end());
      }
    }
    // Which sequences decode at each step, in which row order.
    std::vector<int> all(n), reversed(n), shuffled(n);
    std::iota(all.begin(), all.end(), 0);
    std::reverse_copy(all.begin(), all.end(), reversed.begin());
    shuffled = all;
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(5));
    std::vector<int> fewer(shuffled.begin(), shuffled.begin() + std::max(1, n - 3)), odd;
    for (int k = 1; k < n; k += 2) odd.push_back(k);
    const std::vector<std::vector<int>> orders{all, all, all, reversed, shuffled, fewer, fewer, odd, odd, {n - 1}, all, all};
    int replayed = 0, steps = 0;
    for (size_t st = 0; st < orders.size(); ++st) {
      std::vector<std::pair<int, int>> work;
      for (int k : orders[st]) {
        const int next = argmax(last[k].data(), V);
        re.append_token(k, next);
        rg.append_token(k, next);
        work.push_back({k, 1});
      }
      auto a = re.step(work, adapters_of(work, ad_e)), b = rg.step(work, adapters_of(work, ad_g));
      compare(a, b, "decode step " + std::to_string(st));
      ++steps;
      replayed += graph.model->last_forward_replayed_graph() ? 1 : 0;
      EXPECT_FALSE(eager.model->last_forward_replayed_graph());
      for (auto [s, one] : work) last[s].assign(a[s].end() - V, a[s].end());
    }
    EXPECT_GE(replayed, steps / 3) << f.name;
    std::printf("[golden-cuda] %-5s %-22s LoRA graphs vs eager: %d of %d decode steps replayed, max |logit diff| %.3g;"
                " prompt logprobs vs PEFT %.3g (tolerance %.3g)\n",
                dtype_name(dt), f.name.c_str(), replayed, steps, worst, worst_peft, m.logprob_tol);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GoldenCuda, ::testing::Values(DType::f32, DType::bf16), dtype_param_name);
