// Backend::sample on the GPU against the CPU op (the reference) on random logits: every parameter
// kind and combinations of them, many seeds, vocabularies of 256000 and odd sizes, tensor-parallel
// layouts with padding in the last shard (filled with huge values that must be ignored), and the
// prompt-logprob targets. Runs on the GPU machine; without a visible GPU every test is skipped.
//
// What must match, and why:
//  - greedy rows and targets: the same id always; logprobs within 1e-4 (both sum exp in double
//    from fp32 values; the GPU's exp is fp32: ~1e-7 relative per term);
//  - sampling rows: the same id, logprob within 1e-4 and the same alternatives on >= 99% of rows.
//    The GPU takes each probability as expf(float(x - lse)) (~1e-6 relative) and sums it in
//    fixed point, the CPU in double: a draw or a top-p / typical-p cut can differ only where u or
//    the threshold falls within ~1e-6 of a cumulative-mass boundary (expected well under 1%;
//    typical-p also orders by |-lp - H| rounded to fp32).
//  - the GPU op is deterministic: a second call gives bitwise the same result.
// Each case prints its worst logprob error and where, and every disagreement (first 10).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <string>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

using namespace quilt;

namespace {

float round_to(DType dt, float v) { return dt == DType::bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

struct Case {
  int64_t V, P, M;
};

// Host logits in the all-gathered layout [P, M, Vr]; padding columns hold 1e4 (must be ignored).
std::vector<float> make_logits(std::mt19937& rng, DType dt, const Case& c, int64_t Vr) {
  std::normal_distribution<float> N(0.0f, 2.5f);
  std::uniform_int_distribution<int64_t> pick(0, c.V - 1);
  std::vector<float> rowv(c.V), all(static_cast<size_t>(c.P * c.M * Vr), 1e4f);
  for (int64_t m = 0; m < c.M; ++m) {
    for (auto& x : rowv) x = N(rng);
    for (int k = 0; k < 8; ++k) rowv[pick(rng)] += 8.0f + 2.0f * k;  // a few likely tokens, as an LM has
    for (int64_t v = 0; v < c.V; ++v) all[((v / Vr) * c.M + m) * Vr + v % Vr] = round_to(dt, rowv[v]);
  }
  return all;
}

// Row `i` of a batch: a parameter kind (greedy, each warper and penalty alone, combinations).
SampleRow make_row(std::mt19937& rng, int i, int64_t M, int64_t V, std::vector<SamplePenalty>& pen) {
  SampleRow r;
  r.row = static_cast<int32_t>(i % M);
  r.seed = rng();
  r.draw = rng() % 100;
  const int kind = i % 12;
  auto uni = [&](float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); };
  switch (kind) {
    case 0: break;                                                  // greedy
    case 1: r.repetition_penalty = uni(1.05f, 2.0f); break;         // greedy + repetition
    case 2: r.frequency_penalty = uni(0.1f, 1.0f), r.presence_penalty = uni(-0.5f, 1.0f); break;
    case 3: r.do_sample = true; break;                              // plain multinomial
    case 4: r.temperature = uni(0.3f, 1.5f); break;
    case 5: r.top_k = 1 + static_cast<int>(rng() % 60); break;
    case 6: r.top_p = uni(0.05f, 0.98f); break;
    case 7: r.typical_p = uni(0.1f, 0.98f); break;
    case 8: r.temperature = 0.7f, r.top_k = 40, r.top_p = 0.9f; break;
    case 9: r.temperature = uni(0.5f, 1.2f), r.top_p = uni(0.5f, 0.95f), r.typical_p = uni(0.5f, 0.95f),
            r.repetition_penalty = 1.3f, r.frequency_penalty = 0.4f, r.presence_penalty = 0.2f; break;
    case 10: r.top_k = 1; r.top_n = 5; break;                      // top-k 1: always the argmax
    case 11: r.do_sample = true, r.top_k = 10, r.top_n = 64; break;  // alternatives past the kept set
  }
  if (i % 5 == 0) r.top_n = std::max<int32_t>(r.top_n, 1 + static_cast<int32_t>(rng() % 20));
  if (kind == 1 || kind == 2 || kind == 9) {
    std::set<int32_t> ids;
    const int n = 1 + static_cast<int>(rng() % 300);
    while (static_cast<int>(ids.size()) < std::min<int64_t>(n, V)) ids.insert(static_cast<int32_t>(rng() % V));
    r.penalty_begin = static_cast<int32_t>(pen.size());
    for (int32_t id : ids) {
      const int32_t gen = static_cast<int32_t>(rng() % 3);
      pen.push_back({id, gen + static_cast<int32_t>(rng() % 3) + (gen == 0 ? 1 : 0), gen});
    }
    r.penalty_count = static_cast<int32_t>(pen.size()) - r.penalty_begin;
  }
  return r;
}

class CudaSample : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the CUDA sampler was not run";
    dt = GetParam();
    cpu = make_backend("cpu");
    gpu = make_backend("cuda", BackendOptions{dt});
  }
  DType dt = DType::f32;
  std::unique_ptr<Backend> cpu, gpu;
};

TEST_P(CudaSample, MatchesCpuOnRandomBatches) {
  const std::vector<Case> cases = {{256000, 1, 24}, {1001, 1, 24}, {1001, 2, 24}, {1001, 4, 24},
                                   {256000, 4, 24}, {256000, 3, 12}, {7, 1, 12},    {130, 4, 12}};
  int sampled_rows = 0, sampled_bad = 0, total_bad_strict = 0;
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    const int64_t Vr = (c.V + c.P - 1) / c.P;
    const int reps = c.V > 10000 ? 3 : 12;
    double worst = 0;
    std::string worst_at;
    int printed = 0;
    for (int rep = 0; rep < reps; ++rep) {
      std::mt19937 rng(static_cast<unsigned>(1000 * ci + rep));
      const std::vector<float> host = make_logits(rng, dt, c, Vr);
      const std::vector<int64_t> shape = c.P == 1 ? std::vector<int64_t>{c.M, Vr} : std::vector<int64_t>{c.P, c.M, Vr};
      const Tensor lc = cpu->from_host(host.data(), DType::f32, shape);
      const Tensor lg = gpu->from_host(host.data(), DType::f32, shape);
      SampleBatch b;
      b.vocab = c.V;
      const int R = 48;
      for (int i = 0; i < R; ++i) b.rows.push_back(make_row(rng, i, c.M, c.V, b.penalties));
      for (int i = 0; i < 16; ++i)
        b.targets.push_back({static_cast<int32_t>(rng() % c.M), static_cast<int32_t>(rng() % c.V)});
      SampleResult rc, rg, rg2;
      cpu->sample(rc, lc, b);
      gpu->sample(rg, lg, b);
      gpu->sample(rg2, lg, b);
      ASSERT_EQ(rg.tokens.size(), b.rows.size());
      ASSERT_EQ(rg.target_logprobs.size(), b.targets.size());
      for (int i = 0; i < R; ++i) {  // deterministic: bitwise the same twice
        ASSERT_EQ(rg.tokens[i].id, rg2.tokens[i].id) << "row " << i;
        ASSERT_EQ(std::memcmp(&rg.tokens[i].logprob, &rg2.tokens[i].logprob, 4), 0) << "row " << i;
        ASSERT_EQ(rg.tokens[i].alternatives, rg2.tokens[i].alternatives) << "row " << i;
      }
      for (int i = 0; i < R; ++i) {
        const SampleRow& r = b.rows[i];
        const SampledToken &x = rc.tokens[i], &y = rg.tokens[i];
        double err = x.id == y.id ? std::abs(double(x.logprob) - y.logprob) : INFINITY;
        bool alts = x.alternatives.size() == y.alternatives.size();
        for (size_t k = 0; alts && k < x.alternatives.size(); ++k) {
          const auto &p = x.alternatives[k], &q = y.alternatives[k];
          const bool both_inf = std::isinf(p.second) && std::isinf(q.second);
          alts = p.first == q.first && (both_inf || std::abs(double(p.second) - q.second) <= 1e-4);
          if (alts && !both_inf) err = std::max(err, std::abs(double(p.second) - q.second));
        }
        const bool ok = x.id == y.id && err <= 1e-4 && alts;
        if (x.id == y.id && err > worst) {
          worst = err;
          worst_at = "rep " + std::to_string(rep) + " row " + std::to_string(i);
        }
        if (!ok) {
          ++total_bad_strict;
          if (printed++ < 10)
            std::printf("  V=%lld P=%lld rep %d row %d (kind %d, T %.3f k %d p %.3f typ %.3f rep %.2f n %d): cpu %d "
                        "%.6f gpu %d %.6f alts %s\n",
                        (long long)c.V, (long long)c.P, rep, i, i % 12, r.temperature, r.top_k, r.top_p, r.typical_p,
                        r.repetition_penalty, r.top_n, x.id, x.logprob, y.id, y.logprob, alts ? "same" : "differ");
        }
        if (r.sampling() && r.top_k != 1) {
          ++sampled_rows;
          sampled_bad += !ok;
        } else {
          EXPECT_TRUE(ok) << "greedy (or top-k 1) row must match: V " << c.V << " P " << c.P << " rep " << rep
                          << " row " << i;
        }
      }
      for (size_t t = 0; t < b.targets.size(); ++t) {
        const double e = std::abs(double(rc.target_logprobs[t]) - rg.target_logprobs[t]);
        EXPECT_LE(e, 1e-4) << "target " << t << " V " << c.V << " P " << c.P;
        if (e > worst) worst = e, worst_at = "target " + std::to_string(t);
      }
    }
    std::printf("[%s] V=%lld P=%lld: worst logprob error %.3g at %s\n", dtype_name(dt), (long long)c.V,
                (long long)c.P, worst, worst_at.c_str());
  }
  std::printf("[%s] sampling rows: %d of %d differ from the CPU (%.2f%%); all rows differing: %d\n", dtype_name(dt),
              sampled_bad, sampled_rows, 100.0 * sampled_bad / std::max(1, sampled_rows), total_bad_strict);
  EXPECT_LE(sampled_bad, sampled_rows / 100) << "more than 1% of sampling rows differ from the CPU";
}

// Rows compared as in MatchesCpuOnRandomBatches; counts and prints the disagreements.
struct Tally {
  int sampled_rows = 0, sampled_bad = 0, printed = 0;
  double worst = 0;
  std::string worst_at;
};
void compare(const SampleBatch& b, const SampleResult& rc, const SampleResult& rg, const std::string& where, Tally& t) {
  for (size_t i = 0; i < b.rows.size(); ++i) {
    const SampleRow& r = b.rows[i];
    const SampledToken &x = rc.tokens[i], &y = rg.tokens[i];
    double err = x.id == y.id ? std::abs(double(x.logprob) - y.logprob) : INFINITY;
    bool alts = x.alternatives.size() == y.alternatives.size();
    for (size_t k = 0; alts && k < x.alternatives.size(); ++k) {
      const auto &p = x.alternatives[k], &q = y.alternatives[k];
      const bool both_inf = std::isinf(p.second) && std::isinf(q.second);
      alts = p.first == q.first && (both_inf || std::abs(double(p.second) - q.second) <= 1e-4);
      if (alts && !both_inf) err = std::max(err, std::abs(double(p.second) - q.second));
    }
    const bool ok = x.id == y.id && err <= 1e-4 && alts;
    if (x.id == y.id && err > t.worst) t.worst = err, t.worst_at = where + " row " + std::to_string(i);
    if (!ok && t.printed++ < 10) {
      std::printf("  %s row %zu (T %.3f k %d p %.3f typ %.3f rep %.2f n %d): cpu %d %.6f gpu %d %.6f alts %s\n",
                  where.c_str(), i, r.temperature, r.top_k, r.top_p, r.typical_p, r.repetition_penalty, r.top_n, x.id,
                  x.logprob, y.id, y.logprob, alts ? "same" : "differ");
      for (size_t k = 0; !alts && k < std::max(x.alternatives.size(), y.alternatives.size()) && k < 8; ++k)
        std::printf("    alt %zu: cpu %d %.6f gpu %d %.6f\n", k,
                    k < x.alternatives.size() ? x.alternatives[k].first : -1,
                    k < x.alternatives.size() ? x.alternatives[k].second : 0.0f,
                    k < y.alternatives.size() ? y.alternatives[k].first : -1,
                    k < y.alternatives.size() ? y.alternatives[k].second : 0.0f);
    }
    if (r.sampling() && r.top_k != 1) {
      ++t.sampled_rows;
      t.sampled_bad += !ok;
    } else {
      EXPECT_TRUE(ok) << "greedy (or top-k 1) row must match: " << where << " row " << i;
    }
  }
  for (size_t k = 0; k < b.targets.size(); ++k) {
    const double e = std::abs(double(rc.target_logprobs[k]) - rg.target_logprobs[k]);
    EXPECT_LE(e, 1e-4) << "target " << k << " " << where;
    if (e > t.worst) t.worst = e, t.worst_at = where + " target " + std::to_string(k);
  }
}

// Batches of 1-3 rows: the GPU spreads each row over many blocks (the batch of 48 above gets 6 a
// row, these ~125), whose radix histograms, lists, tie cuts and draw meet across blocks. Every
// row kind alone, V = 256000 in one and two shards, and logits on a 0.25 grid (hundreds of ties at
// every threshold: the cut in id order across blocks).
TEST_P(CudaSample, SmallBatchesMatchCpu) {
  const int64_t V = 256000, M = 3;
  Tally tally;
  int calls = 0;
  for (int64_t P : {1, 2}) {
    for (bool coarse : {false, true}) {
      const int64_t Vr = (V + P - 1) / P;
      const Case c{V, P, M};
      std::mt19937 rng(static_cast<unsigned>(77 + 10 * P + coarse));
      std::vector<float> host = make_logits(rng, dt, c, Vr);
      if (coarse)
        for (float& x : host)
          if (x < 1e3f) x = std::round(x * 4.0f) / 4.0f;  // exact in bf16 for |x| < 32
      const std::vector<int64_t> shape = P == 1 ? std::vector<int64_t>{M, Vr} : std::vector<int64_t>{P, M, Vr};
      const Tensor lc = cpu->from_host(host.data(), DType::f32, shape);
      const Tensor lg = gpu->from_host(host.data(), DType::f32, shape);
      for (int kind = 0; kind < 12; ++kind) {
        for (int rep = 0; rep < 3; ++rep) {
          SampleBatch b;
          b.vocab = V;
          const int B = 1 + rep;
          for (int j = 0; j < B; ++j) {
            // make_row picks the kind from i % 12 and adds alternatives when i % 5 == 0.
            const int i = kind + 12 * (j + 3 * rep);
            b.rows.push_back(make_row(rng, i, M, V, b.penalties));
          }
          if (rep == 1) b.targets.push_back({static_cast<int32_t>(rng() % M), static_cast<int32_t>(rng() % V)});
          SampleResult rc, rg, rg2;
          cpu->sample(rc, lc, b);
          gpu->sample(rg, lg, b);
          gpu->sample(rg2, lg, b);
          ++calls;
          ASSERT_EQ(rg.tokens.size(), b.rows.size());
          for (size_t i = 0; i < b.rows.size(); ++i) {  // deterministic: bitwise the same twice
            ASSERT_EQ(rg.tokens[i].id, rg2.tokens[i].id) << "row " << i;
            ASSERT_EQ(std::memcmp(&rg.tokens[i].logprob, &rg2.tokens[i].logprob, 4), 0) << "row " << i;
            ASSERT_EQ(rg.tokens[i].alternatives, rg2.tokens[i].alternatives) << "row " << i;
          }
          compare(b, rc, rg,
                  "P=" + std::to_string(P) + (coarse ? " coarse" : "") + " kind " + std::to_string(kind) + " rep " +
                      std::to_string(rep),
                  tally);
        }
      }
    }
  }
  std::printf("[%s] small batches: %d calls, worst logprob error %.3g at %s; sampling rows: %d of %d differ\n",
              dtype_name(dt), calls, tally.worst, tally.worst_at.c_str(), tally.sampled_bad, tally.sampled_rows);
  EXPECT_LE(tally.sampled_bad, std::max(1, tally.sampled_rows / 100)) << "more than 1% of sampling rows differ";
}

// Many seeds on one row: the empirical agreement of the draws (the >= 99% criterion per seed).
TEST_P(CudaSample, SeededDrawsAgree) {
  const Case c{256000, 2, 1};
  const int64_t Vr = c.V / 2;
  std::mt19937 rng(7);
  const std::vector<float> host = make_logits(rng, dt, c, Vr);
  const Tensor lc = cpu->from_host(host.data(), DType::f32, {2, 1, Vr});
  const Tensor lg = gpu->from_host(host.data(), DType::f32, {2, 1, Vr});
  SampleBatch b;
  b.vocab = c.V;
  for (int s = 0; s < 256; ++s) {
    SampleRow r;
    r.seed = 12345 + s;
    r.draw = s % 7;
    r.temperature = 0.9f;
    r.top_p = s % 2 ? 0.95f : 1.0f;
    r.do_sample = true;
    b.rows.push_back(r);
  }
  SampleResult rc, rg;
  cpu->sample(rc, lc, b);
  gpu->sample(rg, lg, b);
  int same = 0;
  for (size_t i = 0; i < b.rows.size(); ++i) same += rc.tokens[i].id == rg.tokens[i].id;
  std::printf("[%s] seeded draws: %d of %zu identical\n", dtype_name(dt), same, b.rows.size());
  EXPECT_GE(same * 100, static_cast<int>(b.rows.size()) * 99);
}

TEST_P(CudaSample, RefusesTooManyAlternatives) {
  std::vector<float> host(1000, 0.0f);
  const Tensor lg = gpu->from_host(host.data(), DType::f32, {1, 1000});
  SampleBatch b;
  b.vocab = 1000;
  SampleRow r;
  r.top_n = 2000;
  b.rows.push_back(r);
  SampleResult out;
  EXPECT_THROW(gpu->sample(out, lg, b), Error);
  b.rows[0].top_n = 0;
  b.rows[0].row = 1;
  EXPECT_THROW(gpu->sample(out, lg, b), Error);
}

// µs per sample call (upload, kernels, the result's download and the wait), against downloading
// the logits as the host sampler did.
TEST_P(CudaSample, Timing) {
  if (dt != DType::bf16) GTEST_SKIP() << "timed in bf16 only";
  const int64_t V = 256000;
  std::printf("sample timing on %s, vocab %lld, bf16 logits, median of 20 calls\n", cuda_device_name(*gpu).c_str(),
              (long long)V);
  // Goal (sample.cu's multi-block select): <= 60 us at batch 1 and <= 150 us at batch 32 for the
  // sampling warpers; before it (one block per row): 443 / 313 / 585 us at batch 1 (H100).
  for (int B : {1, 8, 32, 256}) {
    Tensor logits = gpu->empty({B, V}, DType::bf16);
    cuda_fill_normal(*gpu, logits, 99, 3.0f);
    auto time = [&](const SampleBatch& b) {
      SampleResult out;
      std::vector<double> us;
      for (int it = 0; it < 23; ++it) {
        const auto t0 = std::chrono::steady_clock::now();
        gpu->sample(out, logits, b);
        const auto t1 = std::chrono::steady_clock::now();
        if (it >= 3) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
      std::sort(us.begin(), us.end());
      return us[us.size() / 2];
    };
    auto batch = [&](auto edit) {
      SampleBatch b;
      b.vocab = V;
      for (int i = 0; i < B; ++i) {
        SampleRow r;
        r.row = i;
        r.seed = 1 + i;
        edit(r);
        b.rows.push_back(r);
      }
      return b;
    };
    const double greedy = time(batch([](SampleRow&) {}));
    const double top_p = time(batch([](SampleRow& r) { r.temperature = 0.8f, r.top_p = 0.9f; }));
    const double top_k = time(batch([](SampleRow& r) { r.temperature = 0.8f, r.top_k = 50; }));
    const double typical = time(batch([](SampleRow& r) { r.typical_p = 0.9f; }));
    std::vector<float> host(static_cast<size_t>(B * V));
    std::vector<double> dl;
    for (int it = 0; it < 13; ++it) {
      const auto t0 = std::chrono::steady_clock::now();
      gpu->to_host_f32(host.data(), logits);
      const auto t1 = std::chrono::steady_clock::now();
      if (it >= 3) dl.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(dl.begin(), dl.end());
    std::printf("  batch %3d: greedy %8.1f us | temp+top-p 0.9 %8.1f us | temp+top-k 50 %8.1f us | typical 0.9 %8.1f "
                "us | (logits download alone %8.1f us)\n",
                B, greedy, top_p, top_k, typical, dl[dl.size() / 2]);
    if (B == 1 || B == 32) {
      const double goal = B == 1 ? 60.0 : 150.0, worst = std::max({top_p, top_k, typical});
      std::printf("  batch %3d: slowest warper %.1f us, goal <= %.0f us: %s\n", B, worst, goal,
                  worst <= goal ? "met" : "NOT met");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaSample, ::testing::Values(DType::f32, DType::bf16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
