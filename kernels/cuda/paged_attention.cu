#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kThreads = 128;  // threads per block, and keys per tile
constexpr int kMaxD = 256;     // Gemma's head_dim
constexpr int kDimsPerThread = kMaxD / kThreads;

// Stage-1 kernel, correct first: one block per (query row, q head) over the paged cache, with
// an fp32 online softmax over tiles of kThreads keys.
//  - scores: thread j of the tile takes key j: slot from the block table, dot(q, k) over D with
//    q in shared memory (fp32) and k read in 16-byte vectors (VEC), times the scale;
//  - softmax: tile max and sum by block reduction; running max m and sum l rescaled per tile;
//  - P V: thread owns output dims tid, tid + kThreads, and walks the tile's keys, so that each
//    V row is read coalesced.
// The row's sequence is found by binary search in cu_seqlens; rows outside every sequence are
// left untouched (as the CPU). The causal limit is the row's position in its context: the row
// is the i-th of the last q_len tokens of a ctx-long context, so it sees keys [0, ctx - q_len + i].
// Blocks outside the cache (the model rejects those tables) are masked instead of read.
// Known weak spots: one block per q head re-reads K/V `group` times (MQA: 8x, mostly from L2),
// and decode with few sequences fills few SMs (no split-K yet).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(T* __restrict__ out,                  // [T, Hq * D]
                           const T* __restrict__ qkv,            // [T, (Hq + 2 Hkv) * D]
                           const T* __restrict__ k_cache,        // [slots, Hkv, D]
                           const T* __restrict__ v_cache,        // [slots, Hkv, D]
                           const int32_t* __restrict__ cu,       // [S + 1]
                           const int32_t* __restrict__ lens,     // [S]
                           const int32_t* __restrict__ tables,   // [S, max_blocks]
                           int S, int Hq, int Hkv, int D, int block_size, int max_blocks,
                           float scale, int64_t num_slots) {
  __shared__ float q_s[kMaxD];
  __shared__ float p_s[kThreads];
  __shared__ int64_t off_s[kThreads];
  __shared__ float red[32];

  const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  // s: the last sequence whose first row is <= t (empty sequences share offsets with the next).
  int lo = 0, hi = S;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int s = lo;
  if (s >= S || t >= cu[s + 1]) return;
  const int q_len = cu[s + 1] - cu[s];
  const int n = lens[s] - q_len + (t - cu[s]) + 1;  // keys [0, n)
  if (n <= 0) return;  // q_len > context: rejected by the model
  const int kvh = h / (Hq / Hkv);
  const int64_t row = static_cast<int64_t>(Hq + 2 * Hkv) * D;
  const int32_t* table = tables + static_cast<int64_t>(s) * max_blocks;

  const T* q = qkv + static_cast<int64_t>(t) * row + static_cast<int64_t>(h) * D;
  for (int d = tid; d < D; d += kThreads) q_s[d] = to_f(q[d]);

  float m = -INFINITY, l = 0.f;
  float acc[kDimsPerThread];
#pragma unroll
  for (int k = 0; k < kDimsPerThread; ++k) acc[k] = 0.f;

  for (int j0 = 0; j0 < n; j0 += kThreads) {
    __syncthreads();  // q_s is written; p_s/off_s of the previous tile are consumed
    const int j = j0 + tid;
    float score = -INFINITY;
    int64_t off = -1;
    if (j < n && j / block_size < max_blocks) {
      const int32_t b = table[j / block_size];
      const int64_t slot = static_cast<int64_t>(b) * block_size + j % block_size;
      if (b >= 0 && slot < num_slots) off = (slot * Hkv + kvh) * D;
    }
    if (off >= 0) {
      const T* k = k_cache + off;
      float dot = 0.f;
      if constexpr (VEC) {
        constexpr int N = kVec<T>;
        for (int d = 0; d < D; d += N) {
          float kf[N];
          load_vec(k + d, kf);
#pragma unroll
          for (int e = 0; e < N; ++e) dot += q_s[d + e] * kf[e];
        }
      } else {
        for (int d = 0; d < D; ++d) dot += q_s[d] * to_f(k[d]);
      }
      score = dot * scale;
    }
    const float tile_max = block_max(score, red);
    const float m_new = fmaxf(m, tile_max);
    // All of a tile masked (bad blocks only) keeps m = -inf; avoid exp(-inf - -inf).
    const float corr = m_new == -INFINITY ? 1.f : expf(m - m_new);
    const float p = off >= 0 ? expf(score - m_new) : 0.f;
    p_s[tid] = p;
    off_s[tid] = off < 0 ? 0 : off;
    const float tile_sum = block_sum(p, red);  // its barrier also publishes p_s and off_s
    l = l * corr + tile_sum;
    m = m_new;
    const int cnt = min(kThreads, n - j0);
#pragma unroll
    for (int k = 0; k < kDimsPerThread; ++k) {
      const int d = tid + k * kThreads;
      if (d < D) {
        float a = acc[k] * corr;
        for (int jj = 0; jj < cnt; ++jj) a += p_s[jj] * to_f(v_cache[off_s[jj] + d]);
        acc[k] = a;
      }
    }
  }
  T* o = out + static_cast<int64_t>(t) * Hq * D + static_cast<int64_t>(h) * D;
  const float inv = l > 0.f ? 1.0f / l : 0.f;
#pragma unroll
  for (int k = 0; k < kDimsPerThread; ++k) {
    const int d = tid + k * kThreads;
    if (d < D) o[d] = from_f<T>(acc[k] * inv);
  }
}

}  // namespace

void paged_attention(Context& c, Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                     const Tensor& v_cache, const Tensor& cu_seqlens, const Tensor& seqlens,
                     const Tensor& block_tables, const AttentionParams& p) {
  const int64_t D = p.head_dim, Hq = p.num_q_heads, Hkv = p.num_kv_heads;
  const int64_t row = (Hq + 2 * Hkv) * D;
  const int64_t S = seqlens.numel(), T = qkv.dim(0);
  QUILT_ASSERT(Hkv > 0 && Hq % Hkv == 0 && cu_seqlens.numel() == S + 1 && qkv.dim(1) == row,
               "paged_attention ", qkv.describe(), " with ", Hq, "/", Hkv, " heads of ", D);
  QUILT_ASSERT(out.dim(0) == T && out.dim(1) == Hq * D);
  QUILT_ASSERT(D <= kMaxD && Hq <= 65535, "paged_attention: head_dim ", D, " > ", kMaxD);
  QUILT_ASSERT(block_tables.numel() == S * p.max_blocks_per_seq && p.block_size > 0);
  expect(out, c.dtype, "paged_attention", "out");
  expect(qkv, c.dtype, "paged_attention", "qkv");
  expect(k_cache, c.dtype, "paged_attention", "k_cache");
  expect(v_cache, c.dtype, "paged_attention", "v_cache");
  expect(cu_seqlens, DType::i32, "paged_attention", "cu_seqlens");
  expect(seqlens, DType::i32, "paged_attention", "seqlens");
  expect(block_tables, DType::i32, "paged_attention", "block_tables");
  const int64_t num_slots = k_cache.dim(0);
  QUILT_ASSERT(k_cache.numel() == num_slots * Hkv * D && v_cache.numel() == k_cache.numel());
  if (T == 0 || S == 0) return;
  dispatch(c.dtype, "paged_attention", [&](auto tag) {
    using T_ = decltype(tag);
    const bool vec = D % kVec<T_> == 0 && aligned16(k_cache.data());
    const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(Hq));
    auto kernel = vec ? paged_attention_kernel<T_, true> : paged_attention_kernel<T_, false>;
    kernel<<<grid, kThreads, 0, c.stream>>>(out.as<T_>(), qkv.as<T_>(), k_cache.as<T_>(), v_cache.as<T_>(),
                                            cu_seqlens.as<int32_t>(), seqlens.as<int32_t>(),
                                            block_tables.as<int32_t>(), static_cast<int>(S),
                                            static_cast<int>(Hq), static_cast<int>(Hkv),
                                            static_cast<int>(D), p.block_size, p.max_blocks_per_seq,
                                            p.scale, num_slots);
  });
  check_launch("paged_attention");
}

}  // namespace quilt::cuda
