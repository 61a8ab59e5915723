#pragma once
// The parameters and results of Backend::sample: next-token choice for a batch of rows of logits
// that stay where the model left them, with LoRAX/TGI semantics (runtime/worker/sampler.h):
//   processors on the raw logits: the repetition penalty over every token seen (prompt and
//   generated), then frequency and presence penalties over generated tokens;
//   warpers, only when sampling: temperature, top-k, top-p, typical-p, in that order;
//   then the argmax (greedy) or the token where the cumulative probability, in id order, first
//   exceeds u = uniform_from(seed, draw).
// The reported logprob is log_softmax of the processed (and, when sampling, warped) logits.
// Targets ask for log_softmax(raw logits of a row)[id] (prompt logprobs, as model/greedy.h).
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define QUILT_HOST_DEVICE __host__ __device__
#else
#define QUILT_HOST_DEVICE
#endif

namespace quilt {

// A uniform double in [0, 1) from (seed, index) alone (SplitMix64 of the pair): the same on the
// host and the device, so a request draws the same tokens on every backend and in any batch.
QUILT_HOST_DEVICE inline double uniform_from(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

// One distinct token of a sequence and how often it occurred.
struct SamplePenalty {
  int32_t id = 0;
  int32_t seen = 0;       // in prompt + generated tokens (repetition penalty when > 0)
  int32_t generated = 0;  // in generated tokens (frequency * generated + presence when > 0)
};

// One row to choose a token for.
struct SampleRow {
  int32_t row = 0;  // logits row
  float temperature = 1.0f;         // > 0
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // (0, 1]; 1 = off
  float typical_p = 1.0f;           // (0, 1]; 1 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  bool do_sample = false;
  uint64_t seed = 0;
  uint64_t draw = 0;  // index of this draw in the request (the generated-token count)
  int32_t top_n = 0;  // alternatives to report, best first
  // penalties[penalty_begin, penalty_begin + penalty_count) of the batch: distinct ids.
  int32_t penalty_begin = 0, penalty_count = 0;

  // Sampling is on when do_sample is set or any warper is set.
  bool sampling() const {
    return do_sample || temperature != 1.0f || top_k > 0 || top_p < 1.0f || typical_p < 1.0f;
  }
};

// log_softmax(raw logits of `row`)[id].
struct LogprobTarget {
  int32_t row = 0;
  int32_t id = 0;
};

struct SampleBatch {
  int64_t vocab = 0;  // V: the logits' columns past V (shard padding) are not tokens
  std::vector<SampleRow> rows;
  std::vector<SamplePenalty> penalties;
  std::vector<LogprobTarget> targets;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> alternatives;  // (id, logprob), best first, ties by id
};

struct SampleResult {
  std::vector<SampledToken> tokens;   // one per batch row
  std::vector<float> target_logprobs;  // one per batch target
};

}  // namespace quilt
