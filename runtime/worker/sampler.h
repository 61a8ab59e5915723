#pragma once
// Next-token choice for one sequence, with LoRAX/TGI semantics:
//   processors on the raw logits: the repetition penalty (HF/TGI: over every token of the
//   sequence so far, prompt included), then OpenAI's frequency and presence penalties
//   (logit -= count * frequency + [count > 0] * presence, counting generated tokens only);
//   warpers, only when sampling: temperature, top-k, top-p, typical-p (in that order);
//   then argmax (greedy) or a draw from the warped distribution.
// Sampling is on when do_sample is set or any warper is set (temperature != 1, top_k > 0,
// top_p < 1, typical_p < 1). The reported logprob is log_softmax of the processed (and, when
// sampling, warped) logits, as TGI reports it.
// Draws are reproducible per request: the uniform for generated token n comes from
// (seed, n) alone, so a request gives the same tokens whatever batch it runs in.
// The math lives in the backends' sample op (kernels/cpu/sample.cpp is the reference); a
// SequenceSampler keeps one sequence's state (parameters, token counts, draw index) and describes
// each step's row to that op.
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "quilt/kernels/sample.h"

namespace quilt {

struct SamplingParams {
  float temperature = 1.0f;         // > 0
  int top_k = 0;                    // 0 = off
  float top_p = 1.0f;               // (0, 1]; 1 = off
  float typical_p = 1.0f;           // (0, 1]; 1 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off (HF: divides positive logits, multiplies negative)
  float frequency_penalty = 0.0f;   // subtracts count * f
  float presence_penalty = 0.0f;    // subtracts p once a token has appeared
  bool do_sample = false;
  uint64_t seed = 0;
  int top_n_alternatives = 0;       // how many top alternatives to report with each token

  bool sampling() const;
  // Empty when valid, else a message naming the first bad parameter.
  std::string validate() const;
};

struct TokenChoice {
  int id = 0;
  float logprob = 0;
  std::vector<std::pair<int, float>> alternatives;  // (id, logprob), best first
};

class SequenceSampler {
 public:
  SequenceSampler(const SamplingParams& p, const std::vector<int>& prompt_ids);
  // This step's row for Backend::sample, reading logits row `logits_row`; appends the row's
  // penalty entries (distinct ids) to `penalties` when a penalty is on.
  SampleRow row(int32_t logits_row, std::vector<SamplePenalty>& penalties) const;
  // Records the chosen token: it counts for the penalties and the next draw index.
  void record(int id);
  // Chooses the next token from host logits ([vocab] floats) with the CPU op and records it.
  TokenChoice choose(const float* logits, int64_t vocab);
  int generated() const { return step_; }

 private:
  SamplingParams p_;
  std::unordered_map<int, int> seen_;       // token -> occurrences in prompt + generated
  std::unordered_map<int, int> generated_;  // token -> occurrences in generated tokens
  int step_ = 0;
};

// uniform_from(seed, index), the draws' uniform, lives in quilt/kernels/sample.h.

}  // namespace quilt
