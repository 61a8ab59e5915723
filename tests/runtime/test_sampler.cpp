#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "runtime/worker/sampler.h"

using namespace quilt;

namespace {
std::vector<double> softmax(const std::vector<float>& x) {
  double mx = -INFINITY, sum = 0;
  for (float v : x) mx = std::max(mx, double(v));
  std::vector<double> p;
  for (float v : x) p.push_back(std::exp(v - mx)), sum += p.back();
  for (double& v : p) v /= sum;
  return p;
}
// Empirical distribution of the first token over many seeds.
std::vector<double> histogram(const SamplingParams& base, const std::vector<float>& logits, int n = 40000) {
  std::vector<double> h(logits.size(), 0);
  for (int s = 0; s < n; ++s) {
    SamplingParams p = base;
    p.seed = 1000 + s;
    SequenceSampler smp(p, {});
    h[smp.choose(logits.data(), logits.size()).id] += 1.0 / n;
  }
  return h;
}
}  // namespace

TEST(Sampler, GreedyIsArgmaxWithItsLogprob) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.0f};
  SequenceSampler s(SamplingParams{}, {});
  const auto c = s.choose(logits.data(), 4);
  EXPECT_EQ(c.id, 1);
  EXPECT_NEAR(c.logprob, std::log(softmax(logits)[1]), 1e-6);
  EXPECT_FALSE(SamplingParams{}.sampling());
}

TEST(Sampler, RepetitionPenaltyOverPromptAndGenerated) {
  // 2.0 / 2 = 1.0 < 1.5: token 0 (in the prompt) loses to token 1.
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  SequenceSampler s(p, {0, 2});
  const std::vector<float> logits = {2.0f, 1.5f, -1.0f};
  const auto c = s.choose(logits.data(), 3);
  EXPECT_EQ(c.id, 1);
  // processed logits [1.0, 1.5, -2.0]
  EXPECT_NEAR(c.logprob, std::log(softmax({1.0f, 1.5f, -2.0f})[1]), 1e-6);
  // token 1 is now penalised too: 1.5 / 2 = 0.75 < 1.0
  EXPECT_EQ(s.choose(logits.data(), 3).id, 0);
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountGeneratedTokensOnly) {
  SamplingParams p;
  p.frequency_penalty = 0.3f;
  p.presence_penalty = 0.25f;
  SequenceSampler s(p, {0, 0, 0});  // the prompt does not count
  const std::vector<float> logits = {1.0f, 0.6f};
  EXPECT_EQ(s.choose(logits.data(), 2).id, 0);  // 1.0 vs 0.6
  const auto c = s.choose(logits.data(), 2);    // token 0: 1.0 - 0.3 - 0.25 = 0.45 < 0.6
  EXPECT_EQ(c.id, 1);
  EXPECT_NEAR(c.logprob, std::log(softmax({0.45f, 0.6f})[1]), 1e-6);
  EXPECT_EQ(s.choose(logits.data(), 2).id, 0);  // token 1: 0.6 - 0.55 = 0.05 < 0.45
}

TEST(Sampler, TemperatureSamplesTheTemperedDistribution) {
  const std::vector<float> logits = {1.0f, 0.0f, -1.0f, 0.5f};
  SamplingParams p;
  p.temperature = 0.7f;
  const auto h = histogram(p, logits);
  const auto want = softmax({1 / 0.7f, 0, -1 / 0.7f, 0.5f / 0.7f});
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(h[i], want[i], 0.01) << i;
}

TEST(Sampler, TopKKeepsTheKBest) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 0.0f};
  SamplingParams p;
  p.top_k = 2;
  const auto h = histogram(p, logits, 20000);
  EXPECT_EQ(h[0] + h[3], 0.0);
  EXPECT_NEAR(h[1], softmax({3, 2})[0], 0.015);
  p.top_k = 1;
  p.do_sample = true;
  EXPECT_NEAR(histogram(p, logits, 200)[1], 1.0, 1e-9);
}

TEST(Sampler, TopPKeepsTheSmallestSetReachingP) {
  // probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0, 1} (0.5 < 0.7 before token 1, 0.8 >= 0.7 before token 2)
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  SamplingParams p;
  p.top_p = 0.7f;
  const auto h = histogram(p, logits);
  EXPECT_EQ(h[2] + h[3], 0.0);
  EXPECT_NEAR(h[0], 0.5 / 0.8, 0.01);
  p.seed = 3;
  SequenceSampler s(p, {});
  const auto c = s.choose(logits.data(), 4);
  EXPECT_NEAR(c.logprob, std::log((c.id == 0 ? 0.5 : 0.3) / 0.8), 1e-5);  // renormalised
}

TEST(Sampler, TypicalPKeepsTokensNearTheEntropy) {
  // probs 0.4, 0.3, 0.2, 0.1; entropy H = 1.2799 nats; |-log p - H| = 0.364, 0.076, 0.330, 1.023:
  // order 1, 2, 0, 3. typical_p 0.45: 1 (cum before 0) kept, 2 (0.3 < 0.45) kept, 0 (0.5) dropped.
  const std::vector<float> logits = {std::log(0.4f), std::log(0.3f), std::log(0.2f), std::log(0.1f)};
  SamplingParams p;
  p.typical_p = 0.45f;
  const auto h = histogram(p, logits);
  EXPECT_EQ(h[0] + h[3], 0.0);
  EXPECT_NEAR(h[1], 0.6, 0.01);
}

TEST(Sampler, SeedGivesTheSameTokensWhateverElseRuns) {
  const std::vector<float> logits = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  SamplingParams p;
  p.do_sample = true;
  p.seed = 42;
  SequenceSampler a(p, {1}), b(p, {1});
  SequenceSampler other(SamplingParams{1.0f, 0, 1, 1, 1, 0, 0, true, 7, 0}, {});
  std::vector<int> ta, tb;
  for (int i = 0; i < 50; ++i) {
    ta.push_back(a.choose(logits.data(), 5).id);
    other.choose(logits.data(), 5);  // interleaved work of another request changes nothing
    tb.push_back(b.choose(logits.data(), 5).id);
  }
  EXPECT_EQ(ta, tb);
  p.seed = 43;
  SequenceSampler c(p, {1});
  std::vector<int> tc;
  for (int i = 0; i < 50; ++i) tc.push_back(c.choose(logits.data(), 5).id);
  EXPECT_NE(ta, tc);
}

TEST(Sampler, AlternativesAreTheBestLogprobsInOrder) {
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 2.0f};
  SamplingParams p;
  p.top_n_alternatives = 3;
  SequenceSampler s(p, {});
  const auto c = s.choose(logits.data(), 4);
  ASSERT_EQ(c.alternatives.size(), 3u);
  EXPECT_EQ(c.alternatives[0].first, 1);
  EXPECT_EQ(c.alternatives[1].first, 3);
  EXPECT_EQ(c.alternatives[2].first, 2);
  EXPECT_NEAR(c.alternatives[1].second, std::log(softmax(logits)[3]), 1e-6);
}

TEST(Sampler, ValidationNamesTheParameter) {
  auto bad = [](auto edit) {
    SamplingParams p;
    edit(p);
    return p.validate();
  };
  EXPECT_EQ(SamplingParams{}.validate(), "");
  EXPECT_NE(bad([](SamplingParams& p) { p.temperature = 0; }).find("temperature"), std::string::npos);
  EXPECT_NE(bad([](SamplingParams& p) { p.top_p = 1.5f; }).find("top_p"), std::string::npos);
  EXPECT_NE(bad([](SamplingParams& p) { p.typical_p = 0; }).find("typical_p"), std::string::npos);
  EXPECT_NE(bad([](SamplingParams& p) { p.top_k = -1; }).find("top_k"), std::string::npos);
  EXPECT_NE(bad([](SamplingParams& p) { p.repetition_penalty = 0; }).find("repetition_penalty"), std::string::npos);
  EXPECT_NE(bad([](SamplingParams& p) { p.frequency_penalty = NAN; }).find("frequency_penalty"), std::string::npos);
}
