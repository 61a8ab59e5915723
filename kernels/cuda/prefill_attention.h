#pragma once
// The tensor-core prefill kernel behind paged_attention (paged_attention.cu picks it for the
// sequences whose q_len reaches Context::prefill_min_rows when the host copies of cu_seqlens and
// seqlens are given). Not an op of its own: only paged_attention.cu includes this header.
#include "kernels/cuda/common.cuh"

namespace quilt::cuda {

// Query rows per tile of the prefill kernel: a tile is (sequence, first local query row), and
// every tile runs once per q head.
constexpr int kPrefillTileRows = 64;

// Whether the prefill kernel takes this shape: bf16 or f16, a cache in that dtype or fp8_e4m3,
// head_dim 64, 128 or 256, 16-byte aligned tensors.
bool prefill_attention_supported(const Context& c, const Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                                 const Tensor& v_cache, const AttentionParams& p);

// Enqueues the kernel over `num_tiles` tiles: tiles[2 i] is the sequence, tiles[2 i + 1] the first
// of its local query rows (a multiple of kPrefillTileRows), a device array. Rows of other
// sequences are untouched.
void prefill_attention(Context& c, Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables,
                       const int32_t* tiles, int64_t num_tiles, const AttentionParams& p);

}  // namespace quilt::cuda
