// The model against Hugging Face transformers (fp32) on the golden fixtures: prompt logprobs
// within 1e-3 absolute and identical greedy ids, one prompt at a time and in mixed batches.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include "model/gemma_model.h"
#include "model/greedy.h"
#include "model/tokenizer.h"
#include "runtime/core/check.h"
#include "tests/model/batch_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;
using quilt::testing::BatchRunner;
using quilt::testing::Fixture;

namespace {
constexpr double kLogprobTol = 1e-3;

struct Loaded {
  GemmaConfig cfg;
  std::unique_ptr<Backend> be = make_backend("cpu");
  SoloCommunicator comm;
  std::unique_ptr<GemmaForCausalLM> model;
  explicit Loaded(const Fixture& f) : cfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    model = std::make_unique<GemmaForCausalLM>(cfg, *be, comm, Checkpoint::open(f.dir));
  }
};
}  // namespace

TEST(Golden, TokenizerMatchesSentencepieceIds) {
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    auto tok = Tokenizer::load(f.dir);
    EXPECT_EQ(tok->bos_id(), 2);
    EXPECT_EQ(tok->eos_id(), 1);
    EXPECT_EQ(tok->pad_id(), 0);
    for (const auto* c : f.base_cases()) EXPECT_EQ(tok->encode(c->prompt), c->prompt_ids) << f.name << ": " << c->prompt;
  }
}

TEST(Golden, OnePromptAtATime) {
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded m(f);
    double worst = 0;
    for (const auto* c : f.base_cases()) {
      const GreedyResult r = greedy_generate(*m.model, c->prompt_ids, f.max_new_tokens, m.cfg.eos_token_ids);
      ASSERT_EQ(r.prompt_logprobs.size(), c->prompt_logprobs.size());
      EXPECT_FALSE(r.prompt_logprobs[0].has_value());
      for (size_t i = 1; i < c->prompt_logprobs.size(); ++i) {
        const double d = std::abs(*r.prompt_logprobs[i] - *c->prompt_logprobs[i]);
        worst = std::max(worst, d);
        EXPECT_LE(d, kLogprobTol) << f.name << " prompt token " << i;
      }
      EXPECT_EQ(r.greedy_ids, c->greedy_ids) << f.name << ": " << c->prompt;
      for (size_t i = 0; i < std::min(r.greedy_logprobs.size(), c->greedy_logprobs.size()); ++i) {
        const double d = std::abs(r.greedy_logprobs[i] - c->greedy_logprobs[i]);
        worst = std::max(worst, d);
        EXPECT_LE(d, kLogprobTol) << f.name << " greedy token " << i;
      }
    }
    std::printf("[golden] %-24s max |logprob - HF| = %.3g over %zu prompts\n", f.name.c_str(), worst,
                f.base_cases().size());
  }
}

// All base prompts of a fixture in shared batches: a chunked prefill, a prefill beside it, then
// decode steps for every sequence together.
TEST(Golden, MixedPrefillChunksAndDecodeInOneBatch) {
  for (const Fixture& f : quilt::testing::load_fixtures()) {
    Loaded m(f);
    const int64_t V = m.cfg.vocab_size;
    const auto cases = f.base_cases();
    ASSERT_GE(cases.size(), 2u);
    BatchRunner run(*m.model, 64);
    std::vector<int> seq;
    std::vector<std::vector<float>> prompt_rows(cases.size());
    for (const auto* c : cases) seq.push_back(run.add_sequence(c->prompt_ids));
    const int n0 = static_cast<int>(cases[0]->prompt_ids.size());
    const int first_chunk = std::max(1, n0 / 2);
    // step 1: the first half of prompt 0 beside the whole of prompt 1
    auto r1 = run.step({{seq[0], first_chunk}, {seq[1], static_cast<int>(cases[1]->prompt_ids.size())}});
    prompt_rows[0] = r1[seq[0]];
    prompt_rows[1] = r1[seq[1]];
    // step 2: the rest of prompt 0 beside every other prompt
    std::vector<std::pair<int, int>> w2{{seq[0], n0 - first_chunk}};
    for (size_t k = 2; k < cases.size(); ++k) w2.push_back({seq[k], static_cast<int>(cases[k]->prompt_ids.size())});
    auto r2 = run.step(w2);
    prompt_rows[0].insert(prompt_rows[0].end(), r2[seq[0]].begin(), r2[seq[0]].end());
    for (size_t k = 2; k < cases.size(); ++k) prompt_rows[k] = r2[seq[k]];

    std::vector<std::vector<float>> last(cases.size());
    for (size_t k = 0; k < cases.size(); ++k) {
      const auto& ids = cases[k]->prompt_ids;
      for (size_t i = 1; i < ids.size(); ++i) {
        const double lp = token_logprob(prompt_rows[k].data() + (i - 1) * V, V, ids[i]);
        EXPECT_NEAR(lp, *cases[k]->prompt_logprobs[i], kLogprobTol) << f.name << " seq " << k << " token " << i;
      }
      last[k].assign(prompt_rows[k].end() - V, prompt_rows[k].end());
    }
    // decode all sequences together until each has its golden continuation
    std::vector<std::vector<int>> got(cases.size());
    std::vector<bool> live(cases.size(), true);
    for (int step = 0; step < f.max_new_tokens; ++step) {
      std::vector<std::pair<int, int>> work;
      for (size_t k = 0; k < cases.size(); ++k) {
        if (!live[k]) continue;
        const int next = argmax(last[k].data(), V);
        got[k].push_back(next);
        if (got[k].size() >= cases[k]->greedy_ids.size()) {
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
    for (size_t k = 0; k < cases.size(); ++k) EXPECT_EQ(got[k], cases[k]->greedy_ids) << f.name << " seq " << k;
  }
}

TEST(Golden, ForwardRejectsBadBatchesClearly) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  Loaded m(fixtures.front());
  KvCache kv = m.model->allocate_kv_cache(2);
  ForwardInputs in;
  in.input_ids = {static_cast<int32_t>(m.cfg.vocab_size)};  // out of range
  in.position_ids = {0};
  in.slots = {0};
  in.cu_seqlen_prefill = {0, 1};
  in.block_tables = {0};
  in.max_blocks_per_seq = 1;
  in.seqlen = {1};
  EXPECT_THROW(m.model->forward(in, kv), quilt::Error);
  in.input_ids = {2};
  in.block_tables = {5};  // no such block
  EXPECT_THROW(m.model->forward(in, kv), quilt::Error);
  in.block_tables = {0};
  in.seqlen = {40};  // needs 3 blocks, table has 1
  EXPECT_THROW(m.model->forward(in, kv), quilt::Error);
  in.seqlen = {1};
  in.lm_head_indices = {3};
  EXPECT_THROW(m.model->forward(in, kv), quilt::Error);
  in.lm_head_indices = {};
  EXPECT_NO_THROW(m.model->forward(in, kv));
}
