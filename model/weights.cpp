#include "model/weights.h"

#include <cstring>

#include "runtime/core/check.h"

namespace quilt {

TpLayout TpLayout::make(const GemmaConfig& c, int rank, int size) {
  QUILT_REQUIRE(size >= 1 && rank >= 0 && rank < size, "bad tensor-parallel rank ", rank, " of ", size);
  TpLayout t;
  t.rank = rank;
  t.size = size;
  QUILT_REQUIRE(c.num_attention_heads % size == 0, "tensor parallel size ", size,
                " must divide num_attention_heads (", c.num_attention_heads, ")");
  t.q_heads = c.num_attention_heads / size;
  t.q_head_begin = rank * t.q_heads;
  if (c.num_key_value_heads >= size) {
    QUILT_REQUIRE(c.num_key_value_heads % size == 0, "tensor parallel size ", size,
                  " must divide num_key_value_heads (", c.num_key_value_heads, ")");
    t.kv_heads = c.num_key_value_heads / size;
    t.kv_head_begin = rank * t.kv_heads;
  } else {
    QUILT_REQUIRE(size % c.num_key_value_heads == 0, "num_key_value_heads (",
                  c.num_key_value_heads, ") must divide the tensor parallel size ", size,
                  " to replicate KV heads");
    t.kv_heads = 1;
    t.kv_head_begin = rank / (size / c.num_key_value_heads);
  }
  QUILT_REQUIRE(c.intermediate_size % size == 0, "tensor parallel size ", size,
                " must divide intermediate_size (", c.intermediate_size, ")");
  t.intermediate = c.intermediate_size / size;
  t.intermediate_begin = rank * t.intermediate;
  t.vocab_per_rank = (c.vocab_size + size - 1) / size;
  t.vocab_begin = rank * t.vocab_per_rank;
  return t;
}

namespace {

// Host bytes of a rank's part of a 2-D weight, in its stored dtype, appended to `out`.
void take_block(std::vector<uint8_t>& out, const TensorInfo& t, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1) {
  const int64_t cols = t.shape[1];
  const size_t es = dtype_size(t.dtype);
  const size_t row_bytes = static_cast<size_t>(c1 - c0) * es;
  const size_t at = out.size();
  out.resize(at + static_cast<size_t>(r1 - r0) * row_bytes);
  for (int64_t r = r0; r < r1; ++r)
    std::memcpy(out.data() + at + (r - r0) * row_bytes, t.data + (r * cols + c0) * es, row_bytes);
}

class Loader {
 public:
  Loader(const Checkpoint& ckpt, Backend& be, const LoadProgress& progress, size_t total)
      : ckpt_(ckpt), be_(be), progress_(progress), total_(total) {}

  const TensorInfo& expect(const std::string& name, std::vector<int64_t> shape) {
    const TensorInfo& t = ckpt_.get(name);
    QUILT_REQUIRE(t.shape == shape, "tensor '", name, "' has shape ", t.shape_str(),
                  " but the config implies ", TensorInfo{name, t.dtype, shape, nullptr, 0, ""}.shape_str());
    return t;
  }
  Tensor vector(const std::string& name, int64_t n) {
    const TensorInfo& t = expect(name, {n});
    done(t.bytes);
    return be_.from_host(t.data, t.dtype, {n});
  }
  // Row blocks of several tensors (all of one dtype), concatenated: the fused column layers.
  struct Rows { const TensorInfo* t; int64_t r0, r1; };
  Tensor rows(const std::vector<Rows>& parts) {
    std::vector<uint8_t> buf;
    int64_t n = 0;
    const DType dt = parts.front().t->dtype;
    for (const auto& p : parts) {
      QUILT_REQUIRE(p.t->dtype == dt, "tensors '", parts.front().t->name, "' and '", p.t->name,
                    "' have different dtypes; Quilt fuses them");
      take_block(buf, *p.t, p.r0, p.r1, 0, p.t->shape[1]);
      n += p.r1 - p.r0;
      done(p.t->bytes);
    }
    return be_.from_host(buf.data(), dt, {n, parts.front().t->shape[1]});
  }
  Tensor cols(const TensorInfo& t, int64_t c0, int64_t c1) {
    std::vector<uint8_t> buf;
    take_block(buf, t, 0, t.shape[0], c0, c1);
    done(t.bytes);
    return be_.from_host(buf.data(), t.dtype, {t.shape[0], c1 - c0});
  }
  void done(size_t bytes) {
    done_ += bytes;
    if (progress_) progress_(std::min(done_, total_), total_);
  }

 private:
  const Checkpoint& ckpt_;
  Backend& be_;
  const LoadProgress& progress_;
  size_t total_, done_ = 0;
};

}  // namespace

GemmaWeights load_gemma_weights(const Checkpoint& ckpt, const GemmaConfig& c, const TpLayout& tp,
                                Backend& be, const LoadProgress& progress) {
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Hq = c.num_attention_heads * D, Hkv = c.num_key_value_heads * D;
  Loader ld(ckpt, be, progress, ckpt.total_bytes());
  GemmaWeights w;

  {  // vocab-parallel embedding, zero-padded to vocab_per_rank rows
    const TensorInfo& e = ld.expect("model.embed_tokens.weight", {V, H});
    const int64_t r0 = std::min(tp.vocab_begin, V), r1 = std::min(tp.vocab_begin + tp.vocab_per_rank, V);
    std::vector<uint8_t> buf;
    take_block(buf, e, r0, r1, 0, H);
    buf.resize(static_cast<size_t>(tp.vocab_per_rank * H) * dtype_size(e.dtype), 0);
    w.embed = be.from_host(buf.data(), e.dtype, {tp.vocab_per_rank, H});
    ld.done(e.bytes);
  }
  w.final_norm = ld.vector("model.norm.weight", H);

  w.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights& L = w.layers[l];
    L.input_norm = ld.vector(p + "input_layernorm.weight", H);
    L.post_norm = ld.vector(p + "post_attention_layernorm.weight", H);
    const TensorInfo& q = ld.expect(p + "self_attn.q_proj.weight", {Hq, H});
    const TensorInfo& k = ld.expect(p + "self_attn.k_proj.weight", {Hkv, H});
    const TensorInfo& v = ld.expect(p + "self_attn.v_proj.weight", {Hkv, H});
    const TensorInfo& o = ld.expect(p + "self_attn.o_proj.weight", {H, Hq});
    const int64_t q0 = tp.q_head_begin * D, q1 = q0 + tp.q_heads * D;
    const int64_t k0 = tp.kv_head_begin * D, k1 = k0 + tp.kv_heads * D;
    L.qkv = ld.rows({{&q, q0, q1}, {&k, k0, k1}, {&v, k0, k1}});
    L.o = ld.cols(o, q0, q1);
    const TensorInfo& g = ld.expect(p + "mlp.gate_proj.weight", {I, H});
    const TensorInfo& u = ld.expect(p + "mlp.up_proj.weight", {I, H});
    const TensorInfo& d = ld.expect(p + "mlp.down_proj.weight", {H, I});
    const int64_t i0 = tp.intermediate_begin, i1 = i0 + tp.intermediate;
    L.gate_up = ld.rows({{&g, i0, i1}, {&u, i0, i1}});
    L.down = ld.cols(d, i0, i1);
  }
  return w;
}

}  // namespace quilt
