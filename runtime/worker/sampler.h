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
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

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
  // Chooses the next token from the model's logits ([vocab] floats) and records it.
  TokenChoice choose(const float* logits, int64_t vocab);
  int generated() const { return step_; }

 private:
  SamplingParams p_;
  std::unordered_map<int, int> seen_;       // token -> occurrences in prompt + generated
  std::unordered_map<int, int> generated_;  // token -> occurrences in generated tokens
  int step_ = 0;
  std::vector<float> work_;
};

// A uniform double in [0, 1) from (seed, index) alone (SplitMix64 of the pair).
double uniform_from(uint64_t seed, uint64_t index);

}  // namespace quilt
