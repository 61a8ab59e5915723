// The reference sampler (what SequenceSampler::choose did, row by row): readable, in double where
// sums are taken, sorting the whole vocabulary where a warper needs an order. The CUDA op is
// tested against this one.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/cpu/ops.h"
#include "kernels/sample_checks.h"
#include "runtime/core/check.h"

namespace quilt::cpu {
namespace {

// log_softmax in double over finite entries; -inf stays -inf.
void log_softmax(const std::vector<float>& x, std::vector<double>& out) {
  double mx = -INFINITY;
  for (float v : x) mx = std::max(mx, static_cast<double>(v));
  double sum = 0;
  for (float v : x) sum += std::exp(static_cast<double>(v) - mx);
  const double lse = mx + std::log(sum);
  out.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<double>(x[i]) - lse;
}

// Row `r` of the logits as V contiguous floats.
void gather_row(std::vector<float>& row, const float* logits, const SampleLayout& L, int64_t r) {
  row.resize(static_cast<size_t>(L.vocab));
  for (int64_t p = 0; p < L.shards; ++p) {
    const int64_t v0 = p * L.shard_vocab, n = std::min(L.vocab, v0 + L.shard_vocab) - v0;
    if (n > 0) std::copy_n(logits + (p * L.rows + r) * L.shard_vocab, n, row.data() + v0);
  }
}

SampledToken choose(std::vector<float>& work, const SampleRow& p, const SamplePenalty* pen) {
  const int64_t V = static_cast<int64_t>(work.size());
  // Processors.
  if (p.repetition_penalty != 1.0f)
    for (int32_t i = 0; i < p.penalty_count; ++i) {
      const SamplePenalty& e = pen[i];
      if (e.seen <= 0 || e.id < 0 || e.id >= V) continue;
      float& s = work[e.id];
      s = s > 0 ? s / p.repetition_penalty : s * p.repetition_penalty;
    }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f)
    for (int32_t i = 0; i < p.penalty_count; ++i) {
      const SamplePenalty& e = pen[i];
      if (e.generated <= 0 || e.id < 0 || e.id >= V) continue;
      work[e.id] -= p.frequency_penalty * static_cast<float>(e.generated) + p.presence_penalty;
    }
  const bool sampling = p.sampling();
  if (sampling) {
    if (p.temperature != 1.0f)
      for (float& s : work) s /= p.temperature;
    std::vector<int> order(V);
    std::iota(order.begin(), order.end(), 0);
    // Descending by score, ties by id, so the result is deterministic.
    auto by_score = [&](int a, int b) { return work[a] > work[b] || (work[a] == work[b] && a < b); };
    if (p.top_k > 0 && p.top_k < V) {
      std::nth_element(order.begin(), order.begin() + (p.top_k - 1), order.end(), by_score);
      const float kth = work[order[p.top_k - 1]];
      for (float& s : work)
        if (s < kth) s = -INFINITY;  // HF keeps ties with the k-th score
    }
    std::vector<double> lp;
    if (p.top_p < 1.0f) {
      log_softmax(work, lp);
      std::sort(order.begin(), order.end(), by_score);
      // Keep the smallest top set whose mass reaches top_p (HF: drop where the ascending
      // cumulative mass is <= 1 - top_p), and at least one token.
      double cum = 0;
      size_t keep = 0;
      while (keep < order.size() && (keep == 0 || cum < p.top_p)) cum += std::exp(lp[order[keep++]]);
      for (size_t i = keep; i < order.size(); ++i) work[order[i]] = -INFINITY;
    }
    if (p.typical_p < 1.0f) {
      log_softmax(work, lp);
      double entropy = 0;
      for (int64_t v = 0; v < V; ++v)
        if (std::isfinite(lp[v])) entropy -= std::exp(lp[v]) * lp[v];
      std::vector<double> shifted(V);
      for (int64_t v = 0; v < V; ++v) shifted[v] = std::isfinite(lp[v]) ? std::abs(-lp[v] - entropy) : INFINITY;
      std::sort(order.begin(), order.end(),
                [&](int a, int b) { return shifted[a] < shifted[b] || (shifted[a] == shifted[b] && a < b); });
      // HF TypicalLogitsWarper: keep sorted tokens while the cumulative mass before them is < typical_p.
      double cum = 0;
      size_t keep = 0;
      while (keep < order.size() && (keep == 0 || cum < p.typical_p)) cum += std::exp(lp[order[keep++]]);
      for (size_t i = keep; i < order.size(); ++i) work[order[i]] = -INFINITY;
    }
  }
  std::vector<double> lp;
  log_softmax(work, lp);
  SampledToken c;
  if (sampling) {
    double u = uniform_from(p.seed, p.draw);
    int chosen = -1;
    for (int64_t v = 0; v < V; ++v) {
      if (!std::isfinite(lp[v])) continue;
      chosen = static_cast<int>(v);
      u -= std::exp(lp[v]);
      if (u < 0) break;
    }
    QUILT_ASSERT(chosen >= 0, "no token left to sample");
    c.id = chosen;
  } else {
    c.id = static_cast<int>(std::max_element(work.begin(), work.end()) - work.begin());
  }
  c.logprob = static_cast<float>(lp[c.id]);
  if (p.top_n > 0) {
    const int n = static_cast<int>(std::min<int64_t>(p.top_n, V));
    std::vector<int> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                      [&](int a, int b) { return lp[a] > lp[b] || (lp[a] == lp[b] && a < b); });
    for (int k = 0; k < n; ++k) c.alternatives.push_back({idx[k], static_cast<float>(lp[idx[k]])});
  }
  return c;
}

}  // namespace

void sample(SampleResult& out, const Tensor& logits, const SampleBatch& batch) {
  QUILT_ASSERT(logits.dtype() == DType::f32 && logits.device() == Device::cpu, "sample: logits ", logits.describe());
  const SampleLayout L = check_sample_batch(logits, batch);
  const float* x = logits.as<float>();
  out.tokens.clear();
  out.target_logprobs.clear();
  std::vector<float> row;
  for (const SampleRow& r : batch.rows) {
    gather_row(row, x, L, r.row);
    out.tokens.push_back(choose(row, r, batch.penalties.data() + r.penalty_begin));
  }
  for (const LogprobTarget& t : batch.targets) {
    gather_row(row, x, L, t.row);
    // log_softmax(row)[id] in double, as model/greedy.h's token_logprob.
    double mx = -INFINITY;
    for (float v : row) mx = std::max(mx, static_cast<double>(v));
    double sum = 0;
    for (float v : row) sum += std::exp(static_cast<double>(v) - mx);
    out.target_logprobs.push_back(static_cast<float>(static_cast<double>(row[t.id]) - mx - std::log(sum)));
  }
}

}  // namespace quilt::cpu
