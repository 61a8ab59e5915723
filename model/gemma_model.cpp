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

GemmaForCausalLM::GemmaForCausalLM(const GemmaConfig& config, Backend& backend, Communicator& comm,
                                   GemmaWeights weights)
    : cfg_(config), be_(backend), comm_(comm), tp_(TpLayout::make(config, comm.rank(), comm.size())),
      w_(std::move(weights)) {
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
  auto is = [](const Tensor& t, int64_t rows, int64_t cols) { return t.rank() == 2 && t.dim(0) == rows && t.dim(1) == cols; };
  QUILT_REQUIRE(w_.layers.size() == static_cast<size_t>(cfg_.num_hidden_layers) && is(w_.embed, tp_.vocab_per_rank, H),
                "GemmaForCausalLM: the given weights do not have this config's shapes");
  for (const LayerWeights& L : w_.layers)
    QUILT_REQUIRE(is(L.qkv, (tp_.q_heads + 2 * tp_.kv_heads) * D, H) && is(L.o, H, tp_.q_heads * D) &&
                      is(L.gate_up, 2 * tp_.intermediate, H) && is(L.down, H, tp_.intermediate),
                  "GemmaForCausalLM: a layer's weights do not have this config's shapes");
}

KvCache GemmaForCausalLM::allocate_kv_cache(int num_blocks, int block_size) {
  return KvCache::allocate(be_, cfg_.num_hidden_layers, num_blocks, block_size, tp_.kv_heads,
                           cfg_.head_dim, kv_cache_dtype());
}

size_t GemmaForCausalLM::kv_bytes_per_block(int block_size) const {
  return static_cast<size_t>(cfg_.num_hidden_layers) * 2 * block_size *
         be_.kv_cache_bytes_per_slot(tp_.kv_heads, cfg_.head_dim, kv_cache_dtype());
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

  last_replayed_ = false;
  ForwardOutput out;
  if (forward_graph(in, segments, kv, out)) return out;

  const int64_t M = in.skip_lm_head ? 0 : (in.lm_head_indices.empty() ? T : static_cast<int64_t>(in.lm_head_indices.size()));
  std::vector<int32_t> rows = in.lm_head_indices;
  if (rows.empty() && M > 0) {
    rows.resize(T);
    for (int64_t t = 0; t < T; ++t) rows[t] = static_cast<int32_t>(t);
  }
  for (int32_t r : rows)
    QUILT_REQUIRE(r >= 0 && r < T, "forward: lm_head index ", r, " outside [0, ", T, ")");

  StepTensors st = allocate_step(T, S, M, in.max_blocks_per_seq);
  be_.upload_i32(st.ids, in.input_ids.data());
  be_.upload_i32(st.pos, in.position_ids.data());
  be_.upload_i32(st.slots, in.slots.data());
  be_.upload_i32(st.cu, in.cu_seqlen_prefill.data());
  be_.upload_i32(st.lens, in.seqlen.data());
  be_.upload_i32(st.tables, in.block_tables.data());
  if (M > 0) be_.upload_i32(st.rows, rows.data());
  st.host = &in;
  if (!segments.empty()) {
    const std::vector<int32_t> words = lora_plan(segments, T);
    if (words[0] > 0) {
      st.lora_max_tiles = words[0];
      st.lora_max_rows = static_cast<int>(T);
      st.lora_tiles = be_.empty({static_cast<int64_t>(words.size())}, DType::i32);
      be_.upload_i32(st.lora_tiles, words.data());
      st.lora_part = be_.zeros({lora_partial_floats(st.lora_max_tiles)}, DType::f32);
    }
  }
  run_ops(st, in.max_blocks_per_seq, kv);
  if (M == 0) return out;
  if (in.logits_on_device) {
    out.rows = M;
    out.device_logits = st.all;
    return out;
  }
  return download_logits(st.all, M, M);
}

void GemmaForCausalLM::set_decode_graphs(int max_batch) {
  QUILT_REQUIRE(max_batch >= 0, "decode graphs: max_batch must be >= 0, not ", max_batch);
  graphs_.clear();
  graph_arena_ = StepTensors{};
  graph_lora_part_ = Tensor{};
  graph_max_batch_ = be_.supports_graphs() ? max_batch : 0;
}

GemmaForCausalLM::StepTensors GemmaForCausalLM::allocate_step(int64_t T, int64_t S, int64_t M, int max_blocks) {
  const DType dt = be_.compute_dtype();
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim, P = comm_.size();
  StepTensors t;
  t.ids = be_.empty({T}, DType::i32);
  t.pos = be_.empty({T}, DType::i32);
  t.slots = be_.empty({T}, DType::i32);
  t.cu = be_.empty({S + 1}, DType::i32);
  t.lens = be_.empty({S}, DType::i32);
  t.tables = be_.empty({S, max_blocks}, DType::i32);
  t.rows = be_.empty({M}, DType::i32);
  t.x = be_.empty({T, H}, dt);  // the residual stream
  t.normed = be_.empty({T, H}, dt);
  t.qkv = be_.empty({T, (tp_.q_heads + 2 * tp_.kv_heads) * D}, dt);
  t.attn = be_.empty({T, tp_.q_heads * D}, dt);
  t.proj = be_.empty({T, H}, dt);
  t.gate_up = be_.empty({T, 2 * tp_.intermediate}, dt);
  t.act = be_.empty({T, tp_.intermediate}, dt);
  if (M > 0) {
    t.h = be_.empty({M, H}, dt);
    t.local = be_.empty({M, tp_.vocab_per_rank}, dt);
    t.all = P == 1 ? t.local : be_.empty({P, M, tp_.vocab_per_rank}, dt);
  }
  return t;
}

GemmaForCausalLM::StepTensors GemmaForCausalLM::rows_of(const StepTensors& a, int64_t B, Tensor tables) const {
  StepTensors t;
  t.ids = a.ids.slice_rows(0, B);
  t.pos = a.pos.slice_rows(0, B);
  t.slots = a.slots.slice_rows(0, B);
  t.cu = a.cu.slice_rows(0, B + 1);
  t.lens = a.lens.slice_rows(0, B);
  t.tables = std::move(tables);
  t.rows = a.rows.slice_rows(0, B);
  t.x = a.x.slice_rows(0, B);
  t.normed = a.normed.slice_rows(0, B);
  t.qkv = a.qkv.slice_rows(0, B);
  t.attn = a.attn.slice_rows(0, B);
  t.proj = a.proj.slice_rows(0, B);
  t.gate_up = a.gate_up.slice_rows(0, B);
  t.act = a.act.slice_rows(0, B);
  t.h = a.h.slice_rows(0, B);
  t.local = a.local.slice_rows(0, B);
  if (comm_.size() == 1) {
    t.all = t.local;
  } else {  // [P, B, Vr]: the leading P * B * Vr elements of the arena's [P, max, Vr]
    const int64_t P = comm_.size(), Vr = tp_.vocab_per_rank;
    t.all = a.all.view({a.all.numel()}).slice_rows(0, P * B * Vr).view({P, B, Vr});
  }
  return t;
}

void GemmaForCausalLM::run_ops(StepTensors& t, int max_blocks, KvCache& kv) {
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
  // The reference rounds sqrt(hidden) to the activation dtype before scaling.
  const float normalizer = static_cast<float>(std::sqrt(static_cast<double>(H)));
  be_.embedding(t.x, w_.embed, t.ids, tp_.vocab_begin, normalizer);
  comm_.all_reduce_sum(t.x);

  const RopeParams rope{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, cfg_.rope_theta};
  const KvWriteParams kvw{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, kv.block_size};
  const AttentionParams ap{tp_.q_heads, tp_.kv_heads, cfg_.head_dim, kv.block_size,
                           max_blocks, static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))),
                           t.host ? t.host->cu_seqlen_prefill.data() : nullptr, t.host ? t.host->seqlen.data() : nullptr,
                           t.host ? static_cast<int>(t.host->seqlen.size()) : 0};
  const float eps = cfg_.rms_norm_eps;

  // Multi-LoRA from the step's plan (lora_plan.h): per layer, one shrink and one expand per group
  // of modules sharing an input; the shrink is enqueued before the base matmul, which it may run
  // beside (it reads the input, the matmul writes the output), and the expand after it.
  const bool lora = t.lora_max_tiles > 0;
  LoraStep plan;
  LoraGroup g_qkv, g_o, g_gate_up, g_down;
  if (lora) {
    plan.table = lora_table_->tensor();
    plan.tiles = t.lora_tiles;
    plan.partials = t.lora_part;
    plan.layers = cfg_.num_hidden_layers;
    plan.modules = kNumLoraTargets;
    plan.max_tiles = t.lora_max_tiles;
    plan.max_rows = t.lora_max_rows;
    auto add = [&](LoraGroup& g, LoraTarget tg, int64_t col) {
      const auto [in, out] = lora_local_dims(tg, cfg_, tp_);
      g.k = in;
      g.add(static_cast<int>(tg), col, out);
    };
    add(g_qkv, LoraTarget::q, 0);
    add(g_qkv, LoraTarget::k, g_qkv.n[0]);
    add(g_qkv, LoraTarget::v, g_qkv.n[0] + g_qkv.n[1]);
    add(g_o, LoraTarget::o, 0);
    add(g_gate_up, LoraTarget::gate, 0);
    add(g_gate_up, LoraTarget::up, g_gate_up.n[0]);
    add(g_down, LoraTarget::down, 0);
  }
  auto shrink = [&](int l, const LoraGroup& g, const Tensor& xin) {
    if (lora) be_.lora_shrink(plan, l, g, xin);
  };
  auto expand = [&](int l, const LoraGroup& g, Tensor& y) {
    if (lora) be_.lora_expand(plan, l, g, y);
  };

  be_.rms_norm(t.normed, t.x, w_.layers[0].input_norm, eps);
  for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    shrink(l, g_qkv, t.normed);
    be_.matmul(t.qkv, t.normed, L.qkv, false);
    expand(l, g_qkv, t.qkv);
    be_.rope(t.qkv, t.pos, rope);
    be_.write_kv_cache(kv.k[l], kv.v[l], t.qkv, t.slots, kvw);
    be_.paged_attention(t.attn, t.qkv, kv.k[l], kv.v[l], t.cu, t.lens, t.tables, ap);
    shrink(l, g_o, t.attn);
    be_.matmul(t.proj, t.attn, L.o, false);
    expand(l, g_o, t.proj);  // the rank's partial joins the all-reduce
    comm_.all_reduce_sum(t.proj);
    be_.add_rms_norm(t.x, t.normed, t.proj, L.post_norm, eps);

    shrink(l, g_gate_up, t.normed);
    be_.matmul(t.gate_up, t.normed, L.gate_up, false);
    if (lora)  // the expand rides on the activation's reads of gate_up
      be_.lora_expand_gelu(plan, l, g_gate_up, t.gate_up, t.act);
    else
      be_.gelu_tanh_mul(t.act, t.gate_up);
    shrink(l, g_down, t.act);
    be_.matmul(t.proj, t.act, L.down, false);
    expand(l, g_down, t.proj);
    comm_.all_reduce_sum(t.proj);
    const Tensor& next_norm = l + 1 < cfg_.num_hidden_layers ? w_.layers[l + 1].input_norm : w_.final_norm;
    be_.add_rms_norm(t.x, t.normed, t.proj, next_norm, eps);
  }
  if (t.rows.numel() == 0) return;
  be_.gather_rows(t.h, t.normed, t.rows);
  be_.matmul(t.local, t.h, w_.embed, false);  // tied lm_head
  if (comm_.size() > 1) comm_.all_gather(t.all, t.local);
}

ForwardOutput GemmaForCausalLM::download_logits(const Tensor& all, int64_t M, int64_t M_alloc) {
  const int64_t V = cfg_.vocab_size, Vr = tp_.vocab_per_rank, P = comm_.size();
  ForwardOutput out;
  out.rows = M;
  out.logits.resize(static_cast<size_t>(M * V));
  if (P == 1) {  // [M_alloc, Vr]: the first M rows, straight into place
    if (Vr == V) {
      be_.to_host_f32(out.logits.data(), all.slice_rows(0, M));
      return out;
    }
  }
  // Each rank holds [M, Vr] of its vocab shard; gathered as [P, M_alloc, Vr] and laid out as
  // [M, V] without the padding rows of the last shard.
  std::vector<float> gathered(static_cast<size_t>(P * M_alloc * Vr));
  be_.to_host_f32(gathered.data(), all);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t v0 = p * Vr, n = std::max<int64_t>(0, std::min(V, v0 + Vr) - v0);
    for (int64_t m = 0; m < M; ++m)
      std::copy_n(gathered.data() + (p * M_alloc + m) * Vr, n, out.logits.data() + m * V + v0);
  }
  return out;
}

bool GemmaForCausalLM::forward_graph(const ForwardInputs& in, const std::vector<AdapterSegment>& segments,
                                     KvCache& kv, ForwardOutput& out) {
  const int64_t T = static_cast<int64_t>(in.input_ids.size());
  const int64_t S = static_cast<int64_t>(in.seqlen.size());
  if (graph_max_batch_ <= 0 || T == 0 || T != S || T > graph_max_batch_ || in.skip_lm_head) return false;
  if (!in.lm_head_indices.empty()) {
    if (static_cast<int64_t>(in.lm_head_indices.size()) != T) return false;
    for (int64_t t = 0; t < T; ++t)
      if (in.lm_head_indices[t] != t) return false;
  }
  // Batch bucket: the next power of two, at most max_batch; table width: the next power of two.
  int B = 1;
  while (B < T) B *= 2;
  B = std::min(B, graph_max_batch_);
  int W = 1;
  while (W < in.max_blocks_per_seq) W *= 2;

  if (!graph_arena_.ids.data()) {
    graph_arena_ = allocate_step(graph_max_batch_, graph_max_batch_, graph_max_batch_, 1);
    std::vector<int32_t> rows(graph_max_batch_);
    for (int b = 0; b < graph_max_batch_; ++b) rows[b] = b;
    be_.upload_i32(graph_arena_.rows, rows.data());
  }
  // Adapters: the plan's tiles (at most T <= B) go into this graph's own buffer of B tiles and
  // B rows (the padding rows are base rows: lora_expand_gelu writes every row).
  std::vector<int32_t> lora_words;
  if (!segments.empty()) lora_words = lora_plan(segments, B);
  const bool lora = !lora_words.empty() && lora_words[0] > 0;
  DecodeGraph& g = graphs_[{B, W, lora}];
  if (!g.t.ids.data()) {
    g.t = rows_of(graph_arena_, B, be_.empty({B, W}, DType::i32));
    if (lora) {
      if (!graph_lora_part_.data()) graph_lora_part_ = be_.zeros({lora_partial_floats(graph_max_batch_)}, DType::f32);
      g.t.lora_tiles = be_.empty({kLoraHeaderInts + int64_t{B} * kLoraTileInts + B}, DType::i32);
      g.t.lora_part = graph_lora_part_;
      g.t.lora_max_tiles = B;
      g.t.lora_max_rows = B;
    }
  }
  if (lora) {
    QUILT_ASSERT(lora_words[0] <= B && static_cast<int64_t>(lora_words.size()) <= g.t.lora_tiles.numel());
    Tensor used = g.t.lora_tiles.slice_rows(0, static_cast<int64_t>(lora_words.size()));
    be_.upload_i32(used, lora_words.data());
  }
  // Padding rows decode a one-token context in block 0 and write nothing (slot -1); their
  // outputs are never read.
  std::vector<int32_t> ids(B, 0), pos(B, 0), slots(B, -1), cu(B + 1), lens(B, 1), tables(static_cast<size_t>(B) * W, 0);
  for (int b = 0; b <= B; ++b) cu[b] = b;
  for (int64_t t = 0; t < T; ++t) {
    ids[t] = in.input_ids[t];
    pos[t] = in.position_ids[t];
    slots[t] = in.slots[t];
    lens[t] = in.seqlen[t];
    std::copy_n(in.block_tables.begin() + t * in.max_blocks_per_seq, in.max_blocks_per_seq, tables.begin() + t * W);
  }
  be_.upload_i32(g.t.ids, ids.data());
  be_.upload_i32(g.t.pos, pos.data());
  be_.upload_i32(g.t.slots, slots.data());
  be_.upload_i32(g.t.cu, cu.data());
  be_.upload_i32(g.t.lens, lens.data());
  be_.upload_i32(g.t.tables, tables.data());

  const void* kv_key = kv.k.empty() ? nullptr : kv.k[0].data();
  const uint64_t lora_epoch = lora ? lora_table_->epoch() : 0;
  if (g.graph && g.epoch == be_.graph_epoch() && g.kv_key == kv_key && g.lora_epoch == lora_epoch) {
    g.graph->launch();
    last_replayed_ = true;
  } else {
    // This step runs eagerly (kernels that tune themselves per shape do it here), then the same
    // ops are recorded for the next steps of this bucket.
    g.graph.reset();
    run_ops(g.t, W, kv);
    g.graph = be_.capture_graph([&] { run_ops(g.t, W, kv); });
    g.epoch = be_.graph_epoch();
    g.kv_key = kv_key;
    g.lora_epoch = lora_epoch;
  }
  if (in.logits_on_device) {
    out.rows = T;
    out.device_logits = g.t.all;  // the graphs' buffer: valid until the next forward
  } else {
    out = download_logits(g.t.all, T, B);
  }
  return true;
}

void GemmaForCausalLM::lora_entries(const LoraAdapterShard& a, std::vector<LoraEntry>& out) const {
  const size_t layers = static_cast<size_t>(cfg_.num_hidden_layers);
  out.assign(layers * kNumLoraTargets, LoraEntry{nullptr, nullptr, 0, 0});
  QUILT_REQUIRE(a.layers.size() == layers, "adapter '", a.name, "' has ", a.layers.size(), " layers, the model ", layers);
  for (size_t l = 0; l < layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (const auto& m = a.layers[l][t]; m && m->rank > 0)
        out[l * kNumLoraTargets + t] = LoraEntry{m->A.data(), m->B.data(), m->rank, 0};
}

void GemmaForCausalLM::lora_check(const LoraAdapterShard& a) const {
  for (int l = 0; l < cfg_.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const auto& m = a.layers[l][t];
      if (!m) continue;
      const auto [in, out] = lora_local_dims(static_cast<LoraTarget>(t), cfg_, tp_);
      const int64_t r = m->rank;
      QUILT_REQUIRE(m->A.rank() == 2 && m->B.rank() == 2 && m->A.dim(0) == r && m->A.dim(1) == in &&
                        m->B.dim(0) == out && m->B.dim(1) == r && m->A.dtype() == be_.compute_dtype() &&
                        m->B.dtype() == be_.compute_dtype() && m->A.device() == be_.device() &&
                        m->B.device() == be_.device(),
                    "adapter '", a.name, "' layer ", l, " ", lora_target_name(static_cast<LoraTarget>(t)), " of rank ",
                    r, ": A ", m->A.describe(), " and B ", m->B.describe(), " do not fit this model's [r, ", in,
                    "] and [", out, ", r] on backend ", be_.name());
      QUILT_REQUIRE(r <= kLoraMaxRank, "adapter '", a.name, "' layer ", l, " ",
                    lora_target_name(static_cast<LoraTarget>(t)), " has rank ", r, ", above the LoRA kernels' limit of ",
                    kLoraMaxRank);
    }
}

std::vector<int32_t> GemmaForCausalLM::lora_plan(const std::vector<AdapterSegment>& segments, int64_t T) {
  if (!lora_table_) lora_table_ = std::make_unique<LoraTable>(be_, cfg_.num_hidden_layers, kNumLoraTargets);
  lora_table_->begin_step();
  std::vector<int32_t> row_slot(static_cast<size_t>(T), -1);
  const LoraAdapterShard* last = nullptr;
  int32_t slot = -1;
  for (const AdapterSegment& seg : segments) {
    if (seg.row_end <= seg.row_begin) continue;
    if (seg.adapter != last) {  // neighbours of one adapter are common: one table look-up for them
      lora_entries(*seg.adapter, lora_scratch_);
      // Checked when its entries are new to the table (once, not every step).
      if (!lora_table_->holds(seg.adapter, lora_scratch_)) lora_check(*seg.adapter);
      slot = lora_table_->slot(seg.adapter, lora_scratch_);
      last = seg.adapter;
    }
    std::fill(row_slot.begin() + seg.row_begin, row_slot.begin() + seg.row_end, slot);
  }
  return lora_tiles(row_slot);
}

}  // namespace quilt
