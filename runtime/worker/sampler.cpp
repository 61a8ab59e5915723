#include "runtime/worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "runtime/core/check.h"

namespace quilt {

bool SamplingParams::sampling() const {
  return do_sample || temperature != 1.0f || top_k > 0 || top_p < 1.0f || typical_p < 1.0f;
}

std::string SamplingParams::validate() const {
  if (!(temperature > 0) || !std::isfinite(temperature)) return "`temperature` must be strictly positive";
  if (top_k < 0) return "`top_k` must be strictly positive";
  if (!(top_p > 0 && top_p <= 1)) return "`top_p` must be > 0.0 and <= 1.0";
  if (!(typical_p > 0 && typical_p <= 1)) return "`typical_p` must be > 0.0 and <= 1.0";
  if (!(repetition_penalty > 0) || !std::isfinite(repetition_penalty)) return "`repetition_penalty` must be strictly positive";
  if (!std::isfinite(frequency_penalty)) return "`frequency_penalty` must be a finite number";
  if (!std::isfinite(presence_penalty)) return "`presence_penalty` must be a finite number";
  if (top_n_alternatives < 0) return "`return_k_alternatives` must be >= 0";
  return "";
}

double uniform_from(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

SequenceSampler::SequenceSampler(const SamplingParams& p, const std::vector<int>& prompt_ids) : p_(p) {
  for (int id : prompt_ids) ++seen_[id];
}

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
}  // namespace

TokenChoice SequenceSampler::choose(const float* logits, int64_t V) {
  work_.assign(logits, logits + V);
  // Processors.
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
    // Descending by score, ties by id, so the result is deterministic.
    auto by_score = [&](int a, int b) { return work_[a] > work_[b] || (work_[a] == work_[b] && a < b); };
    if (p_.top_k > 0 && p_.top_k < V) {
      std::nth_element(order.begin(), order.begin() + (p_.top_k - 1), order.end(), by_score);
      const float kth = work_[order[p_.top_k - 1]];
      for (float& s : work_)
        if (s < kth) s = -INFINITY;  // HF keeps ties with the k-th score
    }
    std::vector<double> lp;
    if (p_.top_p < 1.0f) {
      log_softmax(work_, lp);
      std::sort(order.begin(), order.end(), by_score);
      // Keep the smallest top set whose mass reaches top_p (HF: drop where the ascending
      // cumulative mass is <= 1 - top_p), and at least one token.
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
      // HF TypicalLogitsWarper: keep sorted tokens while the cumulative mass before them is < typical_p.
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
    QUILT_ASSERT(chosen >= 0, "no token left to sample");
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

}  // namespace quilt
