#pragma once
// Offline greedy decoding of one prompt, for `quilt generate` and the golden tests. Every rank of
// a tensor-parallel group calls it with the same prompt and gets the same result (the gathered
// logits are identical on every rank).
#include <optional>
#include <vector>

#include "model/gemma_model.h"

namespace quilt {

struct GreedyResult {
  std::vector<int> prompt_ids;
  std::vector<std::optional<double>> prompt_logprobs;  // null for the first token
  std::vector<int> greedy_ids;
  std::vector<double> greedy_logprobs;
  std::vector<float> last_prompt_logits;  // logits at the last prompt position
  double prefill_seconds = 0;             // the one forward over the prompt
  double decode_seconds = 0;              // all decode forwards together
  int decode_steps = 0;
};

// log_softmax(row)[id], computed in double.
double token_logprob(const float* row, int64_t vocab, int id);
// Index of the largest value; the first one on ties (as torch.argmax).
int argmax(const float* row, int64_t vocab);

// With `adapter`, every row runs through that LoRA adapter (this rank's shard).
GreedyResult greedy_generate(GemmaForCausalLM& model, const std::vector<int>& prompt_ids,
                             int max_new_tokens, const std::vector<int>& eos_ids,
                             const LoraAdapterShard* adapter = nullptr);

}  // namespace quilt
