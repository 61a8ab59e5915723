#pragma once
// The CPU backend's ops: readable fp32 reference kernels. Every other backend is tested
// against these. Each op lives in the file of its name.
#include "quilt/kernels/backend.h"

namespace quilt::cpu {

void embedding(Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start, float scale);
void rms_norm(Tensor& out, const Tensor& x, const Tensor& w, float eps);
void add_rms_norm(Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w, float eps);
void matmul(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate);
void rope(Tensor& qkv, const Tensor& positions, const RopeParams& p);
void write_kv_cache(Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& slots,
                    const KvWriteParams& p);
void paged_attention(Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                     const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables,
                     const AttentionParams& p);
void gelu_tanh_mul(Tensor& out, const Tensor& gate_up);
void gather_rows(Tensor& out, const Tensor& x, const Tensor& indices);
void lora_sgmv(Tensor& y, const Tensor& x, const std::vector<LoraSegment>& segments, int64_t col_offset);
void lora_shrink(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& x);
void lora_expand(const LoraStep& step, int layer, const LoraGroup& group, Tensor& y);
void lora_expand_gelu(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& gate_up, Tensor& out);
void sample(SampleResult& out, const Tensor& logits, const SampleBatch& batch);

}  // namespace quilt::cpu
