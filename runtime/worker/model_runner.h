#pragma once
// Executes step plans on one rank's model shard. Every rank of a replica runs the same plan and
// computes the same whole logits (they are gathered), so every rank samples the same tokens
// from the same seeded samplers: each keeps every running sequence's last token locally and a
// decode step needs no input ids from the coordinator and no broadcast between ranks.
#include <memory>
#include <unordered_map>
#include <vector>

#include "model/gemma_model.h"
#include "runtime/messages/messages.h"
#include "runtime/worker/adapter_store.h"
#include "runtime/worker/sampler.h"

namespace quilt {

class ModelRunner {
 public:
  // `adapters` (may be null: base model only) supplies the LoRA slots that rows name.
  ModelRunner(GemmaForCausalLM& model, int num_kv_blocks, int block_size, std::vector<int> eos_ids,
              int replica, const AdapterStore* adapters = nullptr);

  // Runs one plan. A plan that does not fit this runner's state (unknown request, bad block) or
  // a failing forward gives a result with `error` set and no sequence state changed.
  messages::StepResult run(const messages::StepPlan& plan);

  size_t num_sequences() const { return seqs_.size(); }
  int num_kv_blocks() const { return kv_.num_blocks; }

 private:
  struct Sequence {
    std::vector<int> prompt;  // tokens seen in prefill rows so far
    int context = 0;          // tokens in the KV cache
    int last_token = -1;      // the last sampled token, input of the next decode row
    messages::SamplingParams params;
    std::unique_ptr<SequenceSampler> sampler;  // created at the first sampled row
    // Logits of the previous chunk's last token, kept on the backend for the next chunk's first
    // prompt logprob: [P, 1, Vr] or [1, Vr], as forward's device_logits.
    Tensor last_row;
  };
  std::string check(const messages::StepPlan& plan) const;

  GemmaForCausalLM& model_;
  KvCache kv_;
  std::vector<int> eos_;
  int replica_;
  std::unordered_map<uint64_t, Sequence> seqs_;
  const AdapterStore* adapters_;
};

SamplingParams to_sampler_params(const messages::SamplingParams& p);

}  // namespace quilt
