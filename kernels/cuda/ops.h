#pragma once
// The CUDA backend's ops, one per file of the same name (as kernels/cpu/ops.h). Each enqueues
// its work on the context's stream, never allocates and never synchronises. Shapes and
// contracts are those of quilt::Backend (backend.h).
#include <functional>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace quilt::cuda {

void embedding(Context& c, Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start,
               float scale);
void rms_norm(Context& c, Tensor& out, const Tensor& x, const Tensor& w, float eps);
void add_rms_norm(Context& c, Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w, float eps);
void matmul(Context& c, Tensor& y, const Tensor& x, const Tensor& w, bool accumulate);
void rope(Context& c, Tensor& qkv, const Tensor& positions, const RopeParams& p);
void write_kv_cache(Context& c, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,
                    const Tensor& slots, const KvWriteParams& p);
void paged_attention(Context& c, Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                     const Tensor& v_cache, const Tensor& cu_seqlens, const Tensor& seqlens,
                     const Tensor& block_tables, const AttentionParams& p);
void gelu_tanh_mul(Context& c, Tensor& out, const Tensor& gate_up);
void gather_rows(Context& c, Tensor& out, const Tensor& x, const Tensor& indices);
// Multi-LoRA for one or more problems sharing x and y (lora_sgmv and lora_sgmv_multi): two launches.
// Its plan goes up through `upload` (the backend's pinned staging, no synchronisation).
using StageUpload = std::function<void(void* device_dst, const void* host_src, size_t bytes)>;
void lora_sgmv(Context& c, Tensor& y, const Tensor& x, const std::vector<LoraProblem>& problems,
               const StageUpload& upload);
// Multi-LoRA of a step from its plan (backend.h, lora_plan.h): one launch each, sized by
// step.max_tiles. The shrink forks onto c.lora_stream when c.lora_overlap; the expand joins it.
void lora_shrink(Context& c, const LoraStep& step, int layer, const LoraGroup& group, const Tensor& x);
void lora_expand(Context& c, const LoraStep& step, int layer, const LoraGroup& group, Tensor& y);
void lora_expand_gelu(Context& c, const LoraStep& step, int layer, const LoraGroup& group, const Tensor& gate_up,
                      Tensor& out);
// Synchronises (the one exception): its result is read on the host.
void sample(Context& c, SampleResult& out, const Tensor& logits, const SampleBatch& batch);

// Test and benchmark helper: fills t with N(0, stddev^2) values from a counter-based hash of
// (seed, index), rounded to t's dtype.
void fill_normal(Context& c, Tensor& t, uint64_t seed, float stddev);

}  // namespace quilt::cuda
