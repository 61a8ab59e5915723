#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "model/greedy.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"
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

// ---- the backend op against the sampler it replaced --------------------------------------------
// LegacySampler is SequenceSampler::choose as it was before the math moved into Backend::sample
// (kernels/cpu/sample.cpp), kept verbatim: the op must give the same tokens and the same floats.
namespace {
class LegacySampler {
 public:
  LegacySampler(const SamplingParams& p, const std::vector<int>& prompt_ids) : p_(p) {
    for (int id : prompt_ids) ++seen_[id];
  }
  TokenChoice choose(const float* logits, int64_t V) {
    work_.assign(logits, logits + V);
    if (p_.repetition_penalty != 1.0f)
      for (const auto& [id, n] : seen_) {
        if (id < 0 || id >= V) continue;
        float& s = work_[id];
        s = s > 0 ? s / p_.repetition_penalty : s * p_.repetition_penalty;
      }
    if (p_.frequency_penalty != 0.0f || p_.presence_penalty != 0.0f)
      for (const auto& [id, n] : generated_)
        if (id >= 0 && id < V) work_[id] -= p_.frequency_penalty * static_cast<float>(n) + p_.presence_penalty;
    const bool sampling = p_.sampling();
    if (sampling) {
      if (p_.temperature != 1.0f)
        for (float& s : work_) s /= p_.temperature;
      std::vector<int> order(V);
      std::iota(order.begin(), order.end(), 0);
      auto by_score = [&](int a, int b) { return work_[a] > work_[b] || (work_[a] == work_[b] && a < b); };
      if (p_.top_k > 0 && p_.top_k < V) {
        std::nth_element(order.begin(), order.begin() + (p_.top_k - 1), order.end(), by_score);
        const float kth = work_[order[p_.top_k - 1]];
        for (float& s : work_)
          if (s < kth) s = -INFINITY;
      }
      std::vector<double> lp;
      if (p_.top_p < 1.0f) {
        log_softmax(work_, lp);
        std::sort(order.begin(), order.end(), by_score);
        double cum = 0;
        size_t keep = 0;
        while (keep < order.size() && (keep == 0 || cum < p_.top_p)) cum += std::exp(lp[order[keep++]]);
        for (size_t i = keep; i < order.size(); ++i) work_[order[i]] = -INFINITY;
      }
      if (p_.typical_p < 1.0f) {
        log_softmax(work_, lp);
        double entropy = 0;
        for (int64_t v = 0; v < V; ++v)
          if (std::isfinite(lp[v])) entropy -= std::exp(lp[v]) * lp[v];
        std::vector<double> shifted(V);
        for (int64_t v = 0; v < V; ++v) shifted[v] = std::isfinite(lp[v]) ? std::abs(-lp[v] - entropy) : INFINITY;
        std::sort(order.begin(), order.end(), [&](int a, int b) { return shifted[a] < shifted[b] || (shifted[a] == shifted[b] && a < b); });
        double cum = 0;
        size_t keep = 0;
        while (keep < order.size() && (keep == 0 || cum < p_.typical_p)) cum += std::exp(lp[order[keep++]]);
        for (size_t i = keep; i < order.size(); ++i) work_[order[i]] = -INFINITY;
      }
    }
    std::vector<double> lp;
    log_softmax(work_, lp);
    TokenChoice c;
    if (sampling) {
      double u = uniform_from(p_.seed, static_cast<uint64_t>(step_));
      int chosen = -1;
      for (int64_t v = 0; v < V; ++v) {
        if (!std::isfinite(lp[v])) continue;
        chosen = static_cast<int>(v);
        u -= std::exp(lp[v]);
        if (u < 0) break;
      }
      c.id = chosen;
    } else {
      c.id = static_cast<int>(std::max_element(work_.begin(), work_.end()) - work_.begin());
    }
    c.logprob = static_cast<float>(lp[c.id]);
    if (p_.top_n_alternatives > 0) {
      const int n = static_cast<int>(std::min<int64_t>(p_.top_n_alternatives, V));
      std::vector<int> idx(V);
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                        [&](int a, int b) { return lp[a] > lp[b] || (lp[a] == lp[b] && a < b); });
      for (int k = 0; k < n; ++k) c.alternatives.push_back({idx[k], static_cast<float>(lp[idx[k]])});
    }
    ++seen_[c.id];
    ++generated_[c.id];
    ++step_;
    return c;
  }

 private:
  static void log_softmax(const std::vector<float>& x, std::vector<double>& out) {
    double mx = -INFINITY;
    for (float v : x) mx = std::max(mx, static_cast<double>(v));
    double sum = 0;
    for (float v : x) sum += std::exp(static_cast<double>(v) - mx);
    const double lse = mx + std::log(sum);
    out.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<double>(x[i]) - lse;
  }
  SamplingParams p_;
  std::map<int, int> seen_, generated_;
  int step_ = 0;
  std::vector<float> work_;
};

SamplingParams random_params(std::mt19937& rng, int kind) {
  auto uni = [&](float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); };
  SamplingParams p;
  p.seed = rng();
  switch (kind % 10) {
    case 0: break;
    case 1: p.repetition_penalty = uni(1.1f, 2.0f), p.frequency_penalty = uni(0, 1), p.presence_penalty = uni(-1, 1); break;
    case 2: p.do_sample = true; break;
    case 3: p.temperature = uni(0.3f, 1.5f); break;
    case 4: p.top_k = 1 + static_cast<int>(rng() % 40); break;
    case 5: p.top_p = uni(0.05f, 0.99f); break;
    case 6: p.typical_p = uni(0.1f, 0.99f); break;
    case 7: p.temperature = 0.7f, p.top_k = 20, p.top_p = 0.9f, p.repetition_penalty = 1.3f; break;
    case 8: p.typical_p = 0.8f, p.top_p = 0.95f, p.frequency_penalty = 0.5f, p.presence_penalty = 0.3f; break;
    case 9: p.repetition_penalty = 0.8f, p.do_sample = true; break;
  }
  if (kind % 3 == 0) p.top_n_alternatives = 1 + static_cast<int>(rng() % 8);
  return p;
}
}  // namespace

TEST(Sampler, OpGivesTheLegacySamplersTokensAndFloats) {
  for (int64_t V : {5, 257, 1000}) {
    for (int kind = 0; kind < 30; ++kind) {
      std::mt19937 rng(static_cast<unsigned>(V * 100 + kind));
      const SamplingParams p = random_params(rng, kind);
      std::vector<int> prompt;
      for (int i = 0; i < 12; ++i) prompt.push_back(static_cast<int>(rng() % V));
      LegacySampler old(p, prompt);
      SequenceSampler now(p, prompt);
      std::normal_distribution<float> N(0, 2);
      std::vector<float> logits(V);
      for (int step = 0; step < 20; ++step) {
        for (float& x : logits) x = N(rng);
        logits[rng() % V] += 5;
        const TokenChoice a = old.choose(logits.data(), V), b = now.choose(logits.data(), V);
        ASSERT_EQ(a.id, b.id) << "V " << V << " kind " << kind << " step " << step;
        ASSERT_EQ(a.logprob, b.logprob) << "V " << V << " kind " << kind << " step " << step;
        ASSERT_EQ(a.alternatives, b.alternatives) << "V " << V << " kind " << kind << " step " << step;
      }
    }
  }
}

// The backend op on a batch in the tensor-parallel layout (3 shards, padding in the last) gives
// what each sequence's sampler gives alone, and the targets are model/greedy.h's token_logprob.
TEST(Sampler, BatchedOpInShardedLayoutMatchesPerRowChoices) {
  const int64_t V = 1000, P = 3, Vr = 334, M = 6;
  std::mt19937 rng(5);
  std::normal_distribution<float> N(0, 2);
  std::vector<float> rows(M * V), gathered(P * M * Vr, 1e6f);  // padding must be ignored
  for (float& x : rows) x = N(rng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t v = 0; v < V; ++v) gathered[((v / Vr) * M + m) * Vr + v % Vr] = rows[m * V + v];
  auto be = make_backend("cpu");
  const Tensor logits = be->from_host(gathered.data(), DType::f32, {P, M, Vr});
  SampleBatch b;
  b.vocab = V;
  std::vector<SamplingParams> ps;
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < 10; ++i) {
    ps.push_back(random_params(rng, i));
    prompts.push_back({static_cast<int>(rng() % V), static_cast<int>(rng() % V), 3});
    SequenceSampler s(ps.back(), prompts.back());
    b.rows.push_back(s.row(static_cast<int32_t>(i % M), b.penalties));
  }
  for (int t = 0; t < 8; ++t) b.targets.push_back({static_cast<int32_t>(t % M), static_cast<int32_t>(rng() % V)});
  SampleResult out;
  be->sample(out, logits, b);
  ASSERT_EQ(out.tokens.size(), 10u);
  for (int i = 0; i < 10; ++i) {
    SequenceSampler s(ps[i], prompts[i]);
    const TokenChoice c = s.choose(rows.data() + (i % M) * V, V);
    EXPECT_EQ(out.tokens[i].id, c.id) << i;
    EXPECT_EQ(out.tokens[i].logprob, c.logprob) << i;
    EXPECT_EQ(out.tokens[i].alternatives, c.alternatives) << i;
  }
  for (int t = 0; t < 8; ++t)
    EXPECT_EQ(out.target_logprobs[t], static_cast<float>(token_logprob(rows.data() + (t % M) * V, V, b.targets[t].id)));
  b.rows[0].row = static_cast<int32_t>(M);  // outside the logits: a clear error
  EXPECT_THROW(be->sample(out, logits, b), Error);
}
