#pragma once
// Drives GemmaForCausalLM with hand-built batches that mix sequences, chunked prefill and decode,
// over a paged cache whose blocks are handed out out of order. Test-only.
#include <algorithm>
#include <map>
#include <numeric>
#include <vector>

#include "model/gemma_model.h"

namespace quilt::testing {

class BatchRunner {
 public:
  BatchRunner(GemmaForCausalLM& model, int num_blocks, int block_size = 16)
      : model_(model), kv_(model.allocate_kv_cache(num_blocks, block_size)), bs_(block_size) {
    // Hand out blocks from the end, interleaved, so that no sequence gets contiguous blocks.
    for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
  }

  int add_sequence(std::vector<int> ids) {
    seqs_.push_back({std::move(ids), 0, {}});
    return static_cast<int>(seqs_.size()) - 1;
  }
  void append_token(int s, int id) { seqs_[s].ids.push_back(id); }
  const std::vector<int>& ids(int s) const { return seqs_[s].ids; }

  // One forward step: `work` maps sequence -> number of its next tokens to feed. Returns, per
  // sequence, the logits rows of the fed tokens ([n, V] flattened).
  std::map<int, std::vector<float>> step(const std::vector<std::pair<int, int>>& work, AdapterData adapters = {}) {
    ForwardInputs in;
    in.adapter_data = std::move(adapters);
    in.cu_seqlen_prefill.push_back(0);
    int max_blocks = 0;
    for (auto [s, n] : work) max_blocks = std::max(max_blocks, (seqs_[s].done + n + bs_ - 1) / bs_);
    in.max_blocks_per_seq = max_blocks;
    for (auto [s, n] : work) {
      Seq& q = seqs_[s];
      while (static_cast<int>(q.blocks.size()) * bs_ < q.done + n) {
        q.blocks.push_back(free_.back());
        free_.pop_back();
      }
      for (int k = 0; k < n; ++k) {
        const int p = q.done + k;
        in.input_ids.push_back(q.ids.at(p));
        in.position_ids.push_back(p);
        in.slots.push_back(q.blocks[p / bs_] * bs_ + p % bs_);
      }
      in.cu_seqlen_prefill.push_back(static_cast<int32_t>(in.input_ids.size()));
      in.seqlen.push_back(q.done + n);
      in.max_s = std::max(in.max_s, q.done + n);
      for (int b = 0; b < max_blocks; ++b)
        in.block_tables.push_back(b < static_cast<int>(q.blocks.size()) ? q.blocks[b] : 0);
      q.done += n;
    }
    ForwardOutput out = model_.forward(in, kv_);
    const int64_t V = model_.config().vocab_size;
    std::map<int, std::vector<float>> rows;
    for (size_t w = 0; w < work.size(); ++w) {
      const auto b = out.logits.begin() + in.cu_seqlen_prefill[w] * V;
      rows[work[w].first].assign(b, b + work[w].second * V);
    }
    return rows;
  }

 private:
  struct Seq {
    std::vector<int> ids;
    int done;
    std::vector<int> blocks;
  };
  GemmaForCausalLM& model_;
  KvCache kv_;
  int bs_;
  std::vector<int> free_;
  std::vector<Seq> seqs_;
};

}  // namespace quilt::testing
