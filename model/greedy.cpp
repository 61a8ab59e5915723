#include "model/greedy.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "runtime/core/check.h"

namespace quilt {

double token_logprob(const float* row, int64_t vocab, int id) {
  double mx = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, static_cast<double>(row[v]));
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
  return static_cast<double>(row[id]) - mx - std::log(sum);
}

int argmax(const float* row, int64_t vocab) {
  return static_cast<int>(std::max_element(row, row + vocab) - row);
}

GreedyResult greedy_generate(GemmaForCausalLM& model, const std::vector<int>& prompt_ids,
                             int max_new_tokens, const std::vector<int>& eos_ids,
                             const LoraAdapterShard* adapter) {
  const GemmaConfig& c = model.config();
  const int64_t V = c.vocab_size;
  const int P = static_cast<int>(prompt_ids.size());
  QUILT_REQUIRE(P > 0, "generate: the prompt is empty");
  QUILT_REQUIRE(max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  QUILT_REQUIRE(P + max_new_tokens <= c.max_position_embeddings, "generate: prompt (", P,
                " tokens) + max_new_tokens (", max_new_tokens,
                ") exceeds the model's max_position_embeddings (", c.max_position_embeddings, ")");
  constexpr int kBlock = 16;
  const int blocks = (P + max_new_tokens + kBlock - 1) / kBlock;
  KvCache kv = model.allocate_kv_cache(std::max(blocks, 1), kBlock);
  std::vector<int32_t> table(std::max(blocks, 1));
  for (int b = 0; b < static_cast<int>(table.size()); ++b) table[b] = b;

  GreedyResult r;
  r.prompt_ids = prompt_ids;
  ForwardInputs in;
  in.input_ids.assign(prompt_ids.begin(), prompt_ids.end());
  for (int i = 0; i < P; ++i) {
    in.position_ids.push_back(i);
    in.slots.push_back(i);
  }
  in.cu_seqlen_prefill = {0, P};
  in.block_tables = table;
  in.max_blocks_per_seq = static_cast<int>(table.size());
  in.seqlen = {P};
  in.max_s = P;
  if (adapter) in.adapter_data.segments = {AdapterSegment{0, P, adapter}};
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  ForwardOutput out = model.forward(in, kv);  // logits for every prompt row
  r.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();

  r.prompt_logprobs.push_back(std::nullopt);
  for (int i = 1; i < P; ++i)
    r.prompt_logprobs.push_back(token_logprob(out.logits.data() + (i - 1) * V, V, prompt_ids[i]));
  r.last_prompt_logits.assign(out.logits.end() - V, out.logits.end());

  std::vector<float> last(r.last_prompt_logits);
  int ctx = P;
  for (int step = 0; step < max_new_tokens; ++step) {
    const int next = argmax(last.data(), V);
    r.greedy_ids.push_back(next);
    r.greedy_logprobs.push_back(token_logprob(last.data(), V, next));
    if (std::find(eos_ids.begin(), eos_ids.end(), next) != eos_ids.end()) break;
    if (step + 1 == max_new_tokens) break;
    ForwardInputs d;
    d.input_ids = {next};
    d.position_ids = {ctx};
    d.slots = {ctx};
    d.cu_seqlen_prefill = {0, 1};
    d.block_tables = table;
    d.max_blocks_per_seq = static_cast<int>(table.size());
    d.seqlen = {ctx + 1};
    d.max_s = ctx + 1;
    if (adapter) d.adapter_data.segments = {AdapterSegment{0, 1, adapter}};
    const auto t1 = clock::now();
    ForwardOutput o = model.forward(d, kv);
    r.decode_seconds += std::chrono::duration<double>(clock::now() - t1).count();
    ++r.decode_steps;
    last = std::move(o.logits);
    ++ctx;
  }
  return r;
}

}  // namespace quilt
