#include "model/gemma_model.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/check.h"

namespace quilt {

GemmaForCausalLM::GemmaForCausalLM(const GemmaConfig& config, Backend& backend, Communicator& comm,
                                   const Checkpoint& ckpt, const LoadProgress& progress)
    : cfg_(config), be_(backend), comm_(comm), tp_(TpLayout::make(config, comm.rank(), comm.size())) {
  w_ = load_gemma_weights(ckpt, cfg_, tp_, be_, progress);
}

KvCache GemmaForCausalLM::allocate_kv_cache(int num_blocks, int block_size) {
  return KvCache::allocate(be_, cfg_.num_hidden_layers, num_blocks, block_size, tp_.kv_heads,
                           cfg_.head_dim);
}

LoraAdapterShard GemmaForCausalLM::load_adapter(const HostLoraAdapter& adapter) {
  QUILT_REQUIRE(adapter.layers.size() == static_cast<size_t>(cfg_.num_hidden_layers), "adapter '", adapter.name,
                "' was read for a model of ", adapter.layers.size(), " layers, not ", cfg_.num_hidden_layers);
  return shard_lora_adapter(adapter, cfg_, tp_, be_);
}

ForwardOutput GemmaForCausalLM::forward(const ForwardInputs& in, KvCache& kv) {
  const int64_t T = static_cast<int64_t>(in.input_ids.size());
  const int64_t S = static_cast<int64_t>(in.seqlen.size());
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
  QUILT_REQUIRE(in.position_ids.size() == static_cast<size_t>(T) && in.slots.size() == static_cast<size_t>(T),
                "forward: input_ids, position_ids and slots must have one entry per token");
  QUILT_REQUIRE(in.cu_seqlen_prefill.size() == static_cast<size_t>(S + 1) &&
                    in.cu_seqlen_prefill.front() == 0 && in.cu_seqlen_prefill.back() == T,
                "forward: cu_seqlen_prefill must have S+1 offsets from 0 to the token count");
  QUILT_REQUIRE(in.block_tables.size() == static_cast<size_t>(S * in.max_blocks_per_seq),
                "forward: block_tables must be [S, max_blocks_per_seq]");
  QUILT_REQUIRE(in.prefill_cache_indices.empty(),
                "forward: prefill_cache_indices is for sliding-window models; Gemma has none");
  int32_t last_end = -1;
  std::vector<AdapterSegment> segments = in.adapter_data.segments;
  std::sort(segments.begin(), segments.end(), [](const auto& a, const auto& b) { return a.row_begin < b.row_begin; });
  for (const auto& seg : segments) {
    QUILT_REQUIRE(seg.adapter && seg.adapter->layers.size() == static_cast<size_t>(cfg_.num_hidden_layers),
                  "forward: an adapter segment has no adapter for this model");
    QUILT_REQUIRE(seg.row_begin >= 0 && seg.row_begin <= seg.row_end && seg.row_end <= T && seg.row_begin >= last_end,
                  "forward: adapter segments must be disjoint row ranges inside the batch");
    last_end = seg.row_end;
  }
  for (int64_t s = 0; s < S; ++s) {
    const int32_t q = in.cu_seqlen_prefill[s + 1] - in.cu_seqlen_prefill[s];
    QUILT_REQUIRE(q >= 0 && q <= in.seqlen[s], "forward: sequence ", s, " has ", q,
                  " new tokens but a context of ", in.seqlen[s]);
    QUILT_REQUIRE((in.seqlen[s] + kv.block_size - 1) / kv.block_size <= in.max_blocks_per_seq,
                  "forward: sequence ", s, " needs more blocks than block_tables holds");
  }
  for (int32_t id : in.input_ids)
    QUILT_REQUIRE(id >= 0 && id < cfg_.vocab_size, "forward: token id ", id,
                  " outside the vocabulary [0, ", cfg_.vocab_size, ")");
  for (int32_t b : in.block_tables)
    QUILT_REQUIRE(b >= 0 && b < kv.num_blocks, "forward: block ", b, " outside the cache of ", kv.num_blocks, " blocks");
  for (int32_t s : in.slots)
    QUILT_REQUIRE(s < static_cast<int64_t>(kv.num_blocks) * kv.block_size, "forward: slot ", s, " outside the cache");

  const Tensor ids = be_.from_host_i32(in.input_ids.data(), {T});
  const Tensor pos = be_.from_host_i32(in.position_ids.data(), {T});
  const Tensor slots = be_.from_host_i32(in.slots.data(), {T});
  const Tensor cu = be_.from_host_i32(in.cu_seqlen_prefill.data(), {S + 1});
  const Tensor lens = be_.from_host_i32(in.seqlen.data(), {S});
  const Tensor tables = be_.from_host_i32(in.block_tables.data(), {S, in.max_blocks_per_seq});

  const DType dt = be_.compute_dtype();
  const int64_t qkv_w = (tp_.q_heads + 2 * tp_.kv_heads) * D;
  Tensor x = be_.empty({T, H}, dt);  // the residual stream
  Tensor normed = be_.empty({T, H}, dt);
  Tensor qkv = be_.empty({T, qkv_w}, dt);
  Tensor attn = be_.empty({T, tp_.q_heads * D}, dt);
  Tensor proj = be_.empty({T, H}, dt);
  Tensor gate_up = be_.empty({T, 2 * tp_.intermediate}, dt);
  Tensor act = be_.empty({T, tp_.intermediate}, dt);

  // The reference rounds sqrt(hidden) to the activation dtype before scaling.
  const float normalizer = static_cast<float>(std::sqrt(static_cast<double>(H)));
  be_.embedding(x, w_.embed, ids, tp_.vocab_begin, normalizer);
  comm_.all_reduce_sum(x);

  const RopeParams rope{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, cfg_.rope_theta};
  const KvWriteParams kvw{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, kv.block_size};
  const AttentionParams ap{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, kv.block_size,
                           in.max_blocks_per_seq, static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
  const float eps = cfg_.rms_norm_eps;

  // LoRA segments of one module in one layer.
  auto lora = [&](int l, LoraTarget t) {
    std::vector<LoraSegment> out;
    for (const auto& seg : segments)
      if (const auto& m = seg.adapter->layers[l][static_cast<int>(t)])
        out.push_back(LoraSegment{seg.row_begin, seg.row_end, &m->A, &m->B});
    return out;
  };
  auto apply = [&](Tensor& y, const Tensor& xin, int l, LoraTarget t, int64_t col) {
    if (segments.empty()) return;
    const auto segs = lora(l, t);
    if (!segs.empty()) be_.lora_sgmv(y, xin, segs, col);
  };
  const int64_t q_w = static_cast<int64_t>(tp_.q_heads) * D, kv_w = static_cast<int64_t>(tp_.kv_heads) * D;

  be_.rms_norm(normed, x, w_.layers[0].input_norm, eps);
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    be_.matmul(qkv, normed, L.qkv, false);
    apply(qkv, normed, l, LoraTarget::q, 0);
    apply(qkv, normed, l, LoraTarget::k, q_w);
    apply(qkv, normed, l, LoraTarget::v, q_w + kv_w);
    be_.rope(qkv, pos, rope);
    be_.write_kv_cache(kv.k[l], kv.v[l], qkv, slots, kvw);
    be_.paged_attention(attn, qkv, kv.k[l], kv.v[l], cu, lens, tables, ap);
    be_.matmul(proj, attn, L.o, false);
    apply(proj, attn, l, LoraTarget::o, 0);  // the rank's partial joins the all-reduce
    comm_.all_reduce_sum(proj);
    be_.add_rms_norm(x, normed, proj, L.post_norm, eps);

    be_.matmul(gate_up, normed, L.gate_up, false);
    apply(gate_up, normed, l, LoraTarget::gate, 0);
    apply(gate_up, normed, l, LoraTarget::up, tp_.intermediate);
    be_.gelu_tanh_mul(act, gate_up);
    be_.matmul(proj, act, L.down, false);
    apply(proj, act, l, LoraTarget::down, 0);
    comm_.all_reduce_sum(proj);
    const Tensor& next_norm = l + 1 < cfg_.num_hidden_layers ? w_.layers[l + 1].input_norm : w_.final_norm;
    be_.add_rms_norm(x, normed, proj, next_norm, eps);
  }

  ForwardOutput out;
  if (in.skip_lm_head) return out;
  std::vector<int32_t> rows = in.lm_head_indices;
  if (rows.empty()) {
    rows.resize(T);
    for (int64_t t = 0; t < T; ++t) rows[t] = static_cast<int32_t>(t);
  }
  for (int32_t r : rows)
    QUILT_REQUIRE(r >= 0 && r < T, "forward: lm_head index ", r, " outside [0, ", T, ")");
  const int64_t M = static_cast<int64_t>(rows.size());
  const Tensor idx = be_.from_host_i32(rows.data(), {M});
  Tensor h = be_.empty({M, H}, dt);
  be_.gather_rows(h, normed, idx);
  Tensor local = be_.empty({M, tp_.vocab_per_rank}, dt);
  be_.matmul(local, h, w_.embed, false);  // tied lm_head

  const int64_t V = cfg_.vocab_size, Vr = tp_.vocab_per_rank, P = comm_.size();
  out.rows = M;
  out.logits.resize(static_cast<size_t>(M * V));
  // Each rank holds [M, Vr] of its vocab shard; gathered as [P, M, Vr] and laid out as [M, V]
  // without the padding rows of the last shard.
  Tensor all = P == 1 ? local : be_.empty({P, M, Vr}, dt);
  if (P > 1) comm_.all_gather(all, local);
  std::vector<float> gathered(static_cast<size_t>(P * M * Vr));
  be_.to_host_f32(gathered.data(), all);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t v0 = p * Vr, n = std::max<int64_t>(0, std::min(V, v0 + Vr) - v0);
    for (int64_t m = 0; m < M; ++m)
      std::copy_n(gathered.data() + (p * M + m) * Vr, n, out.logits.data() + m * V + v0);
  }
  return out;
}

}  // namespace quilt
