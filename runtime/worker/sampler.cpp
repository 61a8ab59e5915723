#include "runtime/worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/cpu/ops.h"
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

SequenceSampler::SequenceSampler(const SamplingParams& p, const std::vector<int>& prompt_ids) : p_(p) {
  for (int id : prompt_ids) ++seen_[id];
}

SampleRow SequenceSampler::row(int32_t logits_row, std::vector<SamplePenalty>& penalties) const {
  SampleRow r;
  r.row = logits_row;
  r.temperature = p_.temperature;
  r.top_k = p_.top_k;
  r.top_p = p_.top_p;
  r.typical_p = p_.typical_p;
  r.repetition_penalty = p_.repetition_penalty;
  r.frequency_penalty = p_.frequency_penalty;
  r.presence_penalty = p_.presence_penalty;
  r.do_sample = p_.do_sample;
  r.seed = p_.seed;
  r.draw = static_cast<uint64_t>(step_);
  r.top_n = p_.top_n_alternatives;
  r.penalty_begin = static_cast<int32_t>(penalties.size());
  const bool rep = p_.repetition_penalty != 1.0f, freq = p_.frequency_penalty != 0.0f || p_.presence_penalty != 0.0f;
  if (rep || freq)
    for (const auto& [id, n] : seen_) {  // every generated token is in seen_ too
      const auto g = generated_.find(id);
      penalties.push_back(SamplePenalty{id, n, g == generated_.end() ? 0 : g->second});
    }
  r.penalty_count = static_cast<int32_t>(penalties.size()) - r.penalty_begin;
  return r;
}

void SequenceSampler::record(int id) {
  ++seen_[id];
  ++generated_[id];
  ++step_;
}

TokenChoice SequenceSampler::choose(const float* logits, int64_t V) {
  SampleBatch b;
  b.vocab = V;
  b.rows.push_back(row(0, b.penalties));
  // A view of the caller's row (no storage of its own): the CPU op only reads it.
  const Tensor t(nullptr, const_cast<float*>(logits), DType::f32, Device::cpu, {1, V});
  SampleResult r;
  cpu::sample(r, t, b);
  TokenChoice c;
  c.id = r.tokens[0].id;
  c.logprob = r.tokens[0].logprob;
  for (const auto& [id, lp] : r.tokens[0].alternatives) c.alternatives.push_back({id, lp});
  record(c.id);
  return c;
}

}  // namespace quilt
