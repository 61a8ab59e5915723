#include "runtime/worker/model_runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "runtime/core/check.h"

namespace quilt {

SamplingParams to_sampler_params(const messages::SamplingParams& m) {
  SamplingParams p;
  // temperature 0 (OpenAI's spelling of greedy) turns sampling off.
  p.temperature = m.temperature > 0 ? m.temperature : 1.0f;
  p.top_k = m.top_k;
  p.top_p = m.top_p;
  p.typical_p = m.typical_p;
  p.repetition_penalty = m.repetition_penalty;
  p.frequency_penalty = m.frequency_penalty;
  p.presence_penalty = m.presence_penalty;
  p.do_sample = m.temperature > 0 && m.do_sample;
  if (m.temperature <= 0) p.top_k = 0, p.top_p = 1, p.typical_p = 1;
  p.seed = m.seed;
  p.top_n_alternatives = m.top_n_alternatives;
  return p;
}

namespace {
// A copy of logits row `r` of forward's device_logits ([M, Vr] or [P, M, Vr]), as [1, Vr] or
// [P, 1, Vr], on the same backend.
Tensor copy_row(Backend& be, const Tensor& logits, int32_t r) {
  const bool sharded = logits.rank() == 3;
  const int64_t P = sharded ? logits.dim(0) : 1, M = logits.dim(-2), Vr = logits.dim(-1);
  std::vector<int32_t> idx(P);
  for (int64_t p = 0; p < P; ++p) idx[p] = static_cast<int32_t>(p * M + r);
  Tensor row = be.empty({P, Vr}, logits.dtype());
  be.gather_rows(row, logits.view({P * M, Vr}), be.from_host_i32(idx.data(), {P}));
  return sharded ? row.view({P, 1, Vr}) : row;
}
}  // namespace

ModelRunner::ModelRunner(GemmaForCausalLM& model, int num_kv_blocks, int block_size,
                         std::vector<int> eos_ids, int replica, const AdapterStore* adapters)
    : model_(model), kv_(model.allocate_kv_cache(num_kv_blocks, block_size)), eos_(std::move(eos_ids)),
      replica_(replica), adapters_(adapters) {}

std::string ModelRunner::check(const messages::StepPlan& plan) const {
  for (const auto& s : plan.sequences) {
    const bool released = std::find(plan.release.begin(), plan.release.end(), s.request_id) != plan.release.end();
    const auto it = seqs_.find(s.request_id);
    const bool known = it != seqs_.end() && !released;
    const int context = known ? it->second.context : 0;
    if (s.kind == messages::RowKind::kDecode && (!known || it->second.last_token < 0))
      return "request " + std::to_string(s.request_id) + ": decode row without a sampled token";
    if (s.start_pos != context)
      return "request " + std::to_string(s.request_id) + ": row starts at position " +
             std::to_string(s.start_pos) + " but the worker holds " + std::to_string(context) + " tokens";
    if (s.kind == messages::RowKind::kPrefill && !known && !s.sampling)
      return "request " + std::to_string(s.request_id) + ": first row carries no sampling parameters";
    const int64_t need = (static_cast<int64_t>(s.start_pos) + s.num_new_tokens + kv_.block_size - 1) / kv_.block_size;
    if (static_cast<int64_t>(s.block_table.size()) < need)
      return "request " + std::to_string(s.request_id) + ": block table too short";
    for (int32_t b : s.block_table)
      if (b < 0 || b >= kv_.num_blocks) return "request " + std::to_string(s.request_id) + ": block " + std::to_string(b) + " outside the cache";
    if (s.adapter_slot != messages::kBaseAdapterSlot && (!adapters_ || !adapters_->slot(s.adapter_slot)))
      return "request " + std::to_string(s.request_id) + ": adapter slot " + std::to_string(s.adapter_slot) +
             " holds no adapter";
    for (int32_t t : s.input_tokens)
      if (t < 0 || t >= model_.config().vocab_size) return "request " + std::to_string(s.request_id) + ": token id " + std::to_string(t) + " outside the vocabulary";
  }
  return "";
}

messages::StepResult ModelRunner::run(const messages::StepPlan& plan) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  messages::StepResult res;
  res.step_id = plan.step_id;
  res.replica = replica_;
  if (std::string err = check(plan); !err.empty()) {
    res.error = err;
    return res;
  }
  for (uint64_t id : plan.release) seqs_.erase(id);

  const int64_t V = model_.config().vocab_size;
  ForwardInputs in;
  in.cu_seqlen_prefill.push_back(0);
  for (const auto& s : plan.sequences)
    in.max_blocks_per_seq = std::max<int>(in.max_blocks_per_seq, static_cast<int>(s.block_table.size()));
  std::vector<int32_t> first_row_of;  // per sequence: its first logits row in the output
  for (const auto& s : plan.sequences) {
    const auto it = seqs_.find(s.request_id);
    const bool prompt_lp = s.kind == messages::RowKind::kPrefill &&
                           (s.sampling ? s.sampling->prompt_logprobs : it != seqs_.end() && it->second.params.prompt_logprobs);
    const int n = s.num_new_tokens;
    for (int k = 0; k < n; ++k) {
      const int pos = s.start_pos + k;
      in.input_ids.push_back(s.kind == messages::RowKind::kDecode ? it->second.last_token : s.input_tokens[k]);
      in.position_ids.push_back(pos);
      in.slots.push_back(s.block_table[pos / kv_.block_size] * kv_.block_size + pos % kv_.block_size);
    }
    const int32_t row0 = in.cu_seqlen_prefill.back();
    if (s.adapter_slot != messages::kBaseAdapterSlot) {
      const LoraAdapterShard* a = adapters_->slot(s.adapter_slot);
      auto& segs = in.adapter_data.segments;
      if (!segs.empty() && segs.back().adapter == a && segs.back().row_end == row0)
        segs.back().row_end = row0 + n;  // neighbours of one adapter share a segment
      else
        segs.push_back(AdapterSegment{row0, row0 + n, a});
    }
    first_row_of.push_back(static_cast<int32_t>(in.lm_head_indices.size()));
    if (prompt_lp) {
      for (int k = 0; k < n; ++k) in.lm_head_indices.push_back(row0 + k);
    } else if (s.needs_sample) {
      in.lm_head_indices.push_back(row0 + n - 1);
    }
    in.cu_seqlen_prefill.push_back(row0 + n);
    in.seqlen.push_back(s.start_pos + n);
    in.max_s = std::max(in.max_s, s.start_pos + n);
    for (int b = 0; b < in.max_blocks_per_seq; ++b)
      in.block_tables.push_back(b < static_cast<int>(s.block_table.size()) ? s.block_table[b] : 0);
  }
  in.skip_lm_head = in.lm_head_indices.empty();
  in.logits_on_device = true;

  ForwardOutput out;
  try {
    out = model_.forward(in, kv_);
  } catch (const std::exception& e) {
    res.error = std::string("forward failed: ") + e.what();
    return res;
  }

  // One sample call for every row of the step: sampled rows and prompt-logprob targets. Nothing
  // changes state until it has succeeded.
  Backend& be = model_.backend();
  SampleBatch batch;
  batch.vocab = V;
  std::vector<int> sample_of(plan.sequences.size(), -1);  // per sequence: its batch row
  std::vector<int> target0(plan.sequences.size(), -1);    // per sequence: its first target
  std::vector<float> carried(plan.sequences.size(), NAN);  // logprob of a chunk's first token
  std::vector<std::unique_ptr<SequenceSampler>> fresh(plan.sequences.size());
  std::vector<Tensor> kept_row(plan.sequences.size());  // a chunk's last row, for the next chunk
  try {
    for (size_t i = 0; i < plan.sequences.size(); ++i) {
      const auto& s = plan.sequences[i];
      const auto it = seqs_.find(s.request_id);
      const Sequence* q = it == seqs_.end() ? nullptr : &it->second;
      const messages::SamplingParams& params = s.sampling ? *s.sampling : q->params;
      const bool prompt_lp = s.kind == messages::RowKind::kPrefill && params.prompt_logprobs;
      const int32_t row0 = first_row_of[i];
      if (prompt_lp) {
        target0[i] = static_cast<int>(batch.targets.size());
        for (int k = 1; k < s.num_new_tokens; ++k) batch.targets.push_back({row0 + k - 1, s.input_tokens[k]});
        if (s.start_pos > 0 && q && q->last_row.defined() && q->last_row.numel() > 0) {
          // The previous chunk's last row, kept on the backend: its own (rare) call.
          SampleBatch carry;
          carry.vocab = V;
          carry.targets.push_back({0, s.input_tokens[0]});
          SampleResult r;
          be.sample(r, q->last_row, carry);
          carried[i] = r.target_logprobs[0];
        }
        if (!s.needs_sample) kept_row[i] = copy_row(be, out.device_logits, row0 + s.num_new_tokens - 1);
      }
      if (s.needs_sample) {
        const SequenceSampler* smp = q && q->sampler ? q->sampler.get() : nullptr;
        if (!smp) {
          std::vector<int> prompt = q ? q->prompt : std::vector<int>{};
          if (s.kind == messages::RowKind::kPrefill) prompt.insert(prompt.end(), s.input_tokens.begin(), s.input_tokens.end());
          fresh[i] = std::make_unique<SequenceSampler>(to_sampler_params(params), prompt);
          smp = fresh[i].get();
        }
        sample_of[i] = static_cast<int>(batch.rows.size());
        batch.rows.push_back(smp->row(prompt_lp ? row0 + s.num_new_tokens - 1 : row0, batch.penalties));
      }
    }
  } catch (const std::exception& e) {
    res.error = std::string("sampling failed: ") + e.what();
    return res;
  }
  SampleResult sampled;
  if (!batch.rows.empty() || !batch.targets.empty()) {
    try {
      be.sample(sampled, out.device_logits, batch);
    } catch (const std::exception& e) {
      res.error = std::string("sampling failed: ") + e.what();
      return res;
    }
  }

  for (size_t i = 0; i < plan.sequences.size(); ++i) {
    const auto& s = plan.sequences[i];
    Sequence& q = seqs_[s.request_id];
    if (s.sampling) q.params = *s.sampling;
    messages::SequenceOutput o;
    o.request_id = s.request_id;
    const bool prompt_lp = s.kind == messages::RowKind::kPrefill && q.params.prompt_logprobs;
    if (s.kind == messages::RowKind::kPrefill) {
      if (prompt_lp) {
        for (int k = 0; k < s.num_new_tokens; ++k) {
          const int pos = s.start_pos + k;
          o.prompt_logprobs.push_back(pos == 0 ? NAN : k == 0 ? carried[i] : sampled.target_logprobs[target0[i] + k - 1]);
        }
        if (!s.needs_sample) q.last_row = kept_row[i];
      }
      q.prompt.insert(q.prompt.end(), s.input_tokens.begin(), s.input_tokens.end());
    }
    q.context = s.start_pos + s.num_new_tokens;
    if (s.needs_sample) {
      if (fresh[i]) q.sampler = std::move(fresh[i]);
      const SampledToken& c = sampled.tokens[sample_of[i]];
      q.sampler->record(c.id);
      q.last_token = c.id;
      q.last_row = Tensor();
      o.token = messages::TokenLogprob{c.id, c.logprob};
      for (const auto& [id, lp] : c.alternatives) o.alternatives.push_back({id, lp});
      o.finished_by_eos = std::find(eos_.begin(), eos_.end(), c.id) != eos_.end();
    }
    res.sequences.push_back(std::move(o));
  }
  res.model_us = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(clock::now() - t0).count());
  return res;
}

}  // namespace quilt
