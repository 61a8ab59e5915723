// The worker's plan executor on the golden fixtures: plans of prefill, chunked prefill and
// decode rows reproduce Hugging Face's prompt logprobs and greedy tokens; seeded sampling does
// not depend on what else is in the batch; bad plans are refused without changing state.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "runtime/core/check.h"
#include "runtime/worker/model_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;
namespace msg = quilt::messages;

namespace {
struct Harness {
  GemmaConfig cfg;
  std::unique_ptr<Backend> be = make_backend("cpu");
  SoloCommunicator comm;
  std::unique_ptr<GemmaForCausalLM> model;
  std::unique_ptr<ModelRunner> runner;
  std::map<uint64_t, std::vector<int32_t>> blocks;
  int next_block = 0;
  uint64_t step = 0;

  explicit Harness(const quilt::testing::Fixture& f) : cfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    model = std::make_unique<GemmaForCausalLM>(cfg, *be, comm, Checkpoint::open(f.dir));
    runner = std::make_unique<ModelRunner>(*model, 128, 16, cfg.eos_token_ids, 0);
  }
  std::vector<int32_t>& table(uint64_t id, int tokens) {
    auto& t = blocks[id];
    while (static_cast<int>(t.size()) * 16 < tokens) t.push_back(next_block++);
    return t;
  }
  msg::ScheduledSequence prefill(uint64_t id, const std::vector<int>& ids, int from, int n, bool sample,
                                 std::optional<msg::SamplingParams> p) {
    msg::ScheduledSequence s;
    s.request_id = id;
    s.kind = msg::RowKind::kPrefill;
    s.input_tokens.assign(ids.begin() + from, ids.begin() + from + n);
    s.start_pos = from;
    s.num_new_tokens = n;
    s.block_table = table(id, from + n);
    s.needs_sample = sample;
    s.sampling = p;
    return s;
  }
  msg::ScheduledSequence decode(uint64_t id, int start) {
    msg::ScheduledSequence s;
    s.request_id = id;
    s.kind = msg::RowKind::kDecode;
    s.start_pos = start;
    s.num_new_tokens = 1;
    s.block_table = table(id, start + 1);
    return s;
  }
  msg::StepResult run(std::vector<msg::ScheduledSequence> rows, std::vector<uint64_t> release = {}) {
    msg::StepPlan p;
    p.step_id = ++step;
    p.sequences = std::move(rows);
    p.release = std::move(release);
    return runner->run(p);
  }
};

msg::SamplingParams greedy_with_prompt_logprobs() {
  msg::SamplingParams p;
  p.prompt_logprobs = true;
  p.max_new_tokens = 100;
  return p;
}
}  // namespace

TEST(ModelRunner, PlansReproduceGoldenPromptLogprobsAndGreedyTokens) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    Harness h(f);
    const auto cases = f.base_cases();
    // step 1: prompt 0 in two chunks (first chunk now), prompts 1.. whole
    std::vector<msg::ScheduledSequence> rows;
    const auto& p0 = cases[0]->prompt_ids;
    const int half = static_cast<int>(p0.size()) / 2;
    rows.push_back(h.prefill(0, p0, 0, half, false, greedy_with_prompt_logprobs()));
    for (size_t k = 1; k < cases.size(); ++k)
      rows.push_back(h.prefill(k, cases[k]->prompt_ids, 0, static_cast<int>(cases[k]->prompt_ids.size()), true,
                               greedy_with_prompt_logprobs()));
    auto r1 = h.run(rows);
    ASSERT_EQ(r1.error, "");
    std::map<uint64_t, std::vector<float>> prompt_lp;
    std::map<uint64_t, std::vector<int>> tokens;
    std::map<uint64_t, int> ctx;
    for (const auto& o : r1.sequences) {
      prompt_lp[o.request_id] = o.prompt_logprobs;
      if (o.token) tokens[o.request_id].push_back(o.token->id);
    }
    EXPECT_FALSE(r1.sequences[0].token.has_value());  // a non-final chunk samples nothing
    // step 2: the rest of prompt 0 beside decode rows of the others
    rows.clear();
    rows.push_back(h.prefill(0, p0, half, static_cast<int>(p0.size()) - half, true, std::nullopt));
    for (size_t k = 1; k < cases.size(); ++k) rows.push_back(h.decode(k, static_cast<int>(cases[k]->prompt_ids.size())));
    auto r2 = h.run(rows);
    ASSERT_EQ(r2.error, "");
    for (const auto& o : r2.sequences) {
      if (o.request_id == 0) prompt_lp[0].insert(prompt_lp[0].end(), o.prompt_logprobs.begin(), o.prompt_logprobs.end());
      tokens[o.request_id].push_back(o.token->id);
    }
    for (size_t k = 0; k < cases.size(); ++k) {
      ASSERT_EQ(prompt_lp[k].size(), cases[k]->prompt_ids.size());
      EXPECT_TRUE(std::isnan(prompt_lp[k][0]));
      for (size_t i = 1; i < prompt_lp[k].size(); ++i)
        EXPECT_NEAR(prompt_lp[k][i], *cases[k]->prompt_logprobs[i], 1e-3) << f.name << " seq " << k << " token " << i;
      ctx[k] = static_cast<int>(cases[k]->prompt_ids.size()) + (k == 0 ? 0 : 1);
    }
    // decode until each sequence has its golden length
    for (int step = 0; step < f.max_new_tokens; ++step) {
      rows.clear();
      for (size_t k = 0; k < cases.size(); ++k)
        if (tokens[k].size() < cases[k]->greedy_ids.size()) rows.push_back(h.decode(k, ctx[k]++));
      if (rows.empty()) break;
      auto r = h.run(rows);
      ASSERT_EQ(r.error, "");
      for (const auto& o : r.sequences) tokens[o.request_id].push_back(o.token->id);
    }
    for (size_t k = 0; k < cases.size(); ++k) EXPECT_EQ(tokens[k], cases[k]->greedy_ids) << f.name << " seq " << k;
  }
}

TEST(ModelRunner, SeededSamplingDoesNotDependOnTheBatch) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  const auto& f = fixtures.front();
  const auto cases = f.base_cases();
  msg::SamplingParams p;
  p.do_sample = true;
  p.temperature = 0.9f;
  p.top_p = 0.95f;
  p.seed = 1234;
  auto sample = [&](bool with_neighbour) {
    Harness h(f);
    std::vector<msg::ScheduledSequence> rows{h.prefill(7, cases[1]->prompt_ids, 0, static_cast<int>(cases[1]->prompt_ids.size()), true, p)};
    if (with_neighbour) {
      msg::SamplingParams q = p;
      q.seed = 99;
      rows.push_back(h.prefill(8, cases[2]->prompt_ids, 0, static_cast<int>(cases[2]->prompt_ids.size()), true, q));
    }
    std::vector<int> out{h.run(rows).sequences[0].token->id};
    int ctx = static_cast<int>(cases[1]->prompt_ids.size());
    int ctx8 = static_cast<int>(cases[2]->prompt_ids.size());
    for (int i = 0; i < 8; ++i) {
      rows = {h.decode(7, ctx++)};
      if (with_neighbour) rows.push_back(h.decode(8, ctx8++));
      out.push_back(h.run(rows).sequences[0].token->id);
    }
    return out;
  };
  EXPECT_EQ(sample(false), sample(true));
}

TEST(ModelRunner, BadPlansAreRefusedWithoutSideEffects) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  Harness h(fixtures.front());
  const auto& ids = fixtures.front().base_cases()[0]->prompt_ids;
  const int n = static_cast<int>(ids.size());
  EXPECT_NE(h.run({h.decode(5, 3)}).error.find("decode row without a sampled token"), std::string::npos);
  EXPECT_NE(h.run({h.prefill(5, ids, 0, n, true, std::nullopt)}).error.find("sampling"), std::string::npos);
  auto bad = h.prefill(5, ids, 0, n, true, msg::SamplingParams{});
  bad.block_table = {100000};
  EXPECT_NE(h.run({bad}).error.find("outside the cache"), std::string::npos);
  EXPECT_EQ(h.runner->num_sequences(), 0u);
  auto ok = h.run({h.prefill(5, ids, 0, n, true, msg::SamplingParams{})});
  ASSERT_EQ(ok.error, "");
  EXPECT_NE(h.run({h.decode(5, n + 4)}).error.find("position"), std::string::npos);  // wrong start
  EXPECT_EQ(h.run({h.decode(5, n)}).error, "");
  EXPECT_EQ(h.run({}, {5}).error, "");  // release
  EXPECT_EQ(h.runner->num_sequences(), 0u);
}
