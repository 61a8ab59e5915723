#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/cuda/kv_fp8.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/prefill_attention.h"

namespace quilt::cuda {
namespace {

// Two kernels share the op:
//  - grouped_kernel (every row, when head_dim is 64..256 in steps of 8 with 16-byte aligned
//    caches): one block per (query row, KV head, KV chunk) holding the whole query group, so that
//    each K/V row is read once per query row, not once per query head (FlashInfer's decode
//    schedule). Split-K over the context fills the GPU when there are few rows (decode at small
//    batch): each chunk writes its normalised partial output and log-sum-exp, and merge_kernel
//    rescales them by exp(lse_i - lse_max) and sums them. K/V tiles of kTileKeys keys are staged in shared
//    memory by cp.async, kStages deep.
//  - rowhead_kernel (the stage-1 kernel): one block per (query row, q head), any head_dim. Kept
//    for the shapes the grouped kernel does not take.
// Both find a row's sequence by binary search in cu_seqlens and leave rows outside every sequence
// untouched (as the CPU); the causal limit is the row's position in its context: the i-th of the
// last q_len tokens of a ctx-long context sees keys [0, ctx - q_len + i]. Keys whose block is
// outside the cache (the model rejects those tables) are masked instead of read.
// With host copies of the offsets (AttentionParams::host_cu_seqlens), sequences of at least
// Context::prefill_min_rows query rows go to the tensor-core prefill kernel (prefill_attention.cu)
// instead, and these kernels take the other rows through a row list (GroupedParams::rows).
// An fp8 cache (KV = uint8_t, kv_fp8.cuh) is read as e4m3 and dequantised on load: a key's scale
// multiplies its score, a value's scale its softmax weight (l sums the unscaled weights).

constexpr int kThreads = 128;  // rowhead_kernel: threads per block, and keys per tile
constexpr int kMaxD = 256;     // Gemma's head_dim
constexpr int kDimsPerThread = kMaxD / kThreads;

__device__ __forceinline__ int sequence_of(const int32_t* cu, int S, int t) {
  // The last sequence whose first row is <= t (empty sequences share offsets with the next).
  int lo = 0, hi = S;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, typename KV, bool VEC>
__global__ void __launch_bounds__(kThreads)
    rowhead_kernel(T* __restrict__ out,                  // [T, Hq * D]
                           const T* __restrict__ qkv,            // [T, (Hq + 2 Hkv) * D]
                           const KV* __restrict__ k_cache,       // [slots, Hkv, D]
                           const KV* __restrict__ v_cache,       // [slots, Hkv, D]
                           const float* __restrict__ k_scales,   // [Hkv, slots]: fp8 caches only
                           const float* __restrict__ v_scales,   // [Hkv, slots]: fp8 caches only
                           const int32_t* __restrict__ cu,       // [S + 1]
                           const int32_t* __restrict__ lens,     // [S]
                           const int32_t* __restrict__ tables,   // [S, max_blocks]
                           const int32_t* __restrict__ rows,     // [gridDim.x] rows to compute, or null: all
                           int S, int Hq, int Hkv, int D, int block_size, int max_blocks,
                           float scale, int64_t num_slots) {
  constexpr bool FP8 = std::is_same_v<KV, uint8_t>;
  __shared__ float q_s[kMaxD];
  __shared__ float p_s[kThreads];
  __shared__ float pv_s[FP8 ? kThreads : 1];  // fp8: p times the key's v scale
  __shared__ int64_t off_s[kThreads];
  __shared__ float red[32];

  const int t = rows ? rows[blockIdx.x] : blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
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
    int64_t off = -1, scale_at = 0;
    if (j < n && j / block_size < max_blocks) {
      const int32_t b = table[j / block_size];
      const int64_t slot = static_cast<int64_t>(b) * block_size + j % block_size;
      if (b >= 0 && slot < num_slots) {
        off = (slot * Hkv + kvh) * D;
        scale_at = static_cast<int64_t>(kvh) * num_slots + slot;
      }
    }
    if (off >= 0) {
      const KV* k = k_cache + off;
      float dot = 0.f;
      if constexpr (FP8) {
        if constexpr (VEC) {  // D % 8 == 0: 8-byte loads
          for (int d = 0; d < D; d += 8) {
            float kf[8];
            fp8x8_to_floats(*reinterpret_cast<const uint2*>(k + d), kf);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot += q_s[d + e] * kf[e];
          }
        } else {
          for (int d = 0; d < D; ++d) dot += q_s[d] * fp8_to_float(k[d]);
        }
        dot *= k_scales[scale_at];
      } else if constexpr (VEC) {
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
    if constexpr (FP8) pv_s[tid] = off >= 0 ? p * v_scales[scale_at] : 0.f;
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
        if constexpr (FP8) {
          for (int jj = 0; jj < cnt; ++jj) a += pv_s[jj] * fp8_to_float(v_cache[off_s[jj] + d]);
        } else {
          for (int jj = 0; jj < cnt; ++jj) a += p_s[jj] * to_f(v_cache[off_s[jj] + d]);
        }
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


// ---- grouped split-K kernel ----------------------------------------------------------------

constexpr int kTileKeys = 16;  // keys per shared-memory stage
constexpr int kElems = 8;      // head dims per thread: one 16-byte vector of bf16/f16, two of f32
constexpr int kMaxGroupThreads = 512;
// Split-K: chunks of whole tiles, enough of them for about two blocks per SM (at most kMaxChunks
// per row); the merge kernel then reads every chunk's partial o (G x D x 4 bytes each).
constexpr int kMaxChunks = 256;
constexpr int kMergeThreads = 256;

struct GroupedParams {
  int S, Hq, Hkv, D, block_size, max_blocks;
  int chunk_tokens, num_chunks;
  float scale;
  int64_t num_slots;
  int* counters;  // [R, Hkv], zero: the last chunk's block merges (num_chunks <= kMaxFusedChunks)
  // The rows to compute, [R] (row ri = blockIdx.x is query row rows[ri]), or null: every row (ri = t).
  // Partials and counters are indexed by ri.
  const int32_t* rows;
  const float* k_scales;  // [Hkv, num_slots]: fp8 caches only
  const float* v_scales;
};

// Up to this many chunks the last block of a (row, KV head) to finish merges them itself (one
// launch less); beyond, merge_kernel spreads the reads over a block per q head.
constexpr int kMaxFusedChunks = 32;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[kElems]) {
  constexpr int V = kVec<T>;
#pragma unroll
  for (int i = 0; i < kElems; i += V) {
    float g[V];
    load_vec(p + i, g);
#pragma unroll
    for (int e = 0; e < V; ++e) f[i + e] = g[e];
  }
}
// Eight e4m3 values (8-byte aligned), unscaled.
__device__ __forceinline__ void load8(const uint8_t* p, float (&f)[kElems]) {
  fp8x8_to_floats(*reinterpret_cast<const uint2*>(p), f);
}

// Cache slot of key j, or -1 when masked.
__device__ __forceinline__ int64_t key_slot(const int32_t* table, int j, const GroupedParams& p) {
  const int bi = j / p.block_size;
  if (bi >= p.max_blocks) return -1;
  const int32_t b = table[bi];
  const int64_t slot = static_cast<int64_t>(b) * p.block_size + (j - bi * p.block_size);
  if (b < 0 || slot >= p.num_slots) return -1;
  return slot;
}
// Element offset of key j's row for KV head kvh, or -1 when masked.
__device__ __forceinline__ int64_t key_offset(const int32_t* table, int j, const GroupedParams& p, int kvh) {
  const int bi = j / p.block_size;
  if (bi >= p.max_blocks) return -1;
  const int32_t b = table[bi];
  const int64_t slot = static_cast<int64_t>(b) * p.block_size + (j - bi * p.block_size);
  if (b < 0 || slot >= p.num_slots) return -1;
  return (slot * p.Hkv + kvh) * p.D;
}

// Block (bdx = D / 8, G = Hq / Hkv, bdz): thread (tx, ty, tz) owns dims [8 tx, 8 tx + 8) of query
// head kvh * G + ty and the keys r = tz, tz + bdz, ... of each tile, with its own fp32 online
// softmax (m, l, o[8]), rescaled once per tile; the bdz states are merged through shared memory at
// the end. A score is the dot of the bdx lanes' parts, summed by xor shuffles (every lane gets the
// same bits). Loading: thread i copies 16-byte pieces of key row i / (threads / 16) of the tile,
// so each thread looks up one block-table entry per tile.
//
// With one chunk the block writes out; otherwise each chunk writes its heads' normalised partial
// o and their lse, and either the last block to finish (p.counters set: an atomic count per
// (row, KV head), left zero again) or merge_kernel merges them.
template <typename T, typename KV, int STAGES>
__global__ void __launch_bounds__(kMaxGroupThreads)
    grouped_kernel(T* __restrict__ out,                 // [T, Hq * D]
                   float* __restrict__ part_o,          // [R, Hq, num_chunks, D], when num_chunks > 1
                   float* __restrict__ part_lse,        // [R, Hq, num_chunks]
                   const T* __restrict__ qkv,           // [T, (Hq + 2 Hkv) * D]
                   const KV* __restrict__ k_cache,      // [slots, Hkv, D]
                   const KV* __restrict__ v_cache,      // [slots, Hkv, D]
                   const int32_t* __restrict__ cu,      // [S + 1]
                   const int32_t* __restrict__ lens,    // [S]
                   const int32_t* __restrict__ tables,  // [S, max_blocks]
                   GroupedParams p) {
  constexpr bool FP8 = std::is_same_v<KV, uint8_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ bool valid_s[STAGES][kTileKeys];
  // fp8: the scales of each stage's keys, loaded by cp.async with the keys (0 where masked).
  __shared__ __align__(16) float ksc_s[FP8 ? STAGES : 1][kTileKeys];
  __shared__ __align__(16) float vsc_s[FP8 ? STAGES : 1][kTileKeys];
  __shared__ bool is_last;
  const int bdx = blockDim.x, G = blockDim.y, bdz = blockDim.z;
  const int tx = threadIdx.x, ty = threadIdx.y, tz = threadIdx.z;
  const int tid = tx + bdx * (ty + G * tz), nthreads = bdx * G * bdz;
  const int ri = blockIdx.x, kvh = blockIdx.y, chunk = blockIdx.z;
  const int t = p.rows ? p.rows[ri] : ri;
  const int D = p.D;

  const int s = sequence_of(cu, p.S, t);
  if (s >= p.S || t >= cu[s + 1]) return;
  const int q_len = cu[s + 1] - cu[s];
  const int n = lens[s] - q_len + (t - cu[s]) + 1;  // keys [0, n)
  if (n <= 0) return;                               // q_len > context: rejected by the model
  const int head = kvh * G + ty;
  const int begin = chunk * p.chunk_tokens, end = min(n, begin + p.chunk_tokens);
  const int64_t part = (static_cast<int64_t>(ri) * p.Hq + head) * p.num_chunks + chunk;
  const int32_t* table = tables + static_cast<int64_t>(s) * p.max_blocks;
  if (begin >= end) {  // past this row's context (num_chunks > 1 only); the merge skips it
    if (tx == 0 && tz == 0) part_lse[part] = -INFINITY;
  } else {
    float q[kElems];
    {
      const T* qp = qkv + static_cast<int64_t>(t) * (p.Hq + 2 * p.Hkv) * D + static_cast<int64_t>(head) * D +
                    tx * kElems;
#pragma unroll
      for (int i = 0; i < kElems; ++i) q[i] = to_f(qp[i]);
    }

    KV* ks = reinterpret_cast<KV*>(smem);  // [STAGES][kTileKeys][D]
    KV* vs = ks + STAGES * kTileKeys * D;  // [STAGES][kTileKeys][D]
    constexpr int kPerChunk = 16 / static_cast<int>(sizeof(KV));
    const int cpr = D / kPerChunk;                 // 16-byte pieces per key row
    const int row_threads = nthreads / kTileKeys;  // threads per key row of a tile
    const int load_row = tid / row_threads, load_col = tid - load_row * row_threads;
    const int num_tiles = (end - begin + kTileKeys - 1) / kTileKeys;

    // Every piece of the stage is written: masked keys and keys past `end` as zeros.
    auto load_tile = [&](int tile, int stage) {
      const int j = begin + tile * kTileKeys + load_row;
      int64_t off;
      if constexpr (FP8) {
        const int64_t slot = j < end ? key_slot(table, j, p) : -1;
        off = slot >= 0 ? (slot * p.Hkv + kvh) * D : -1;
        if (load_col == 0) {
          const int64_t at = static_cast<int64_t>(kvh) * p.num_slots + slot;
          cp_async4(&ksc_s[stage][load_row], off >= 0 ? p.k_scales + at : p.k_scales, off >= 0);
          cp_async4(&vsc_s[stage][load_row], off >= 0 ? p.v_scales + at : p.v_scales, off >= 0);
        }
      } else {
        off = j < end ? key_offset(table, j, p, kvh) : -1;
      }
      if (load_col == 0) valid_s[stage][load_row] = off >= 0;
      KV* kd = ks + (stage * kTileKeys + load_row) * D;
      KV* vd = vs + (stage * kTileKeys + load_row) * D;
      for (int col = load_col; col < cpr; col += row_threads) {
        cp_async16(kd + col * kPerChunk, off >= 0 ? k_cache + off + col * kPerChunk : k_cache, off >= 0);
        cp_async16(vd + col * kPerChunk, off >= 0 ? v_cache + off + col * kPerChunk : v_cache, off >= 0);
      }
    };

#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < num_tiles) load_tile(i, i);
      cp_async_commit();
    }

    float m = -INFINITY, l = 0.f, o[kElems];
#pragma unroll
    for (int i = 0; i < kElems; ++i) o[i] = 0.f;
    const int per = kTileKeys / bdz;  // keys of a tile per thread, the same in every thread

    for (int tile = 0; tile < num_tiles; ++tile) {
      const int next = tile + STAGES - 1;
      if (next < num_tiles) load_tile(next, next % STAGES);
      cp_async_commit();
      cp_async_wait<STAGES - 1>();  // tile's group has landed (this thread's copies)
      __syncthreads();              // ... and every thread's, with its valid_s flags
      const int stage = tile % STAGES;
      const KV* kt = ks + stage * kTileKeys * D + tx * kElems;
      const KV* vt = vs + stage * kTileKeys * D + tx * kElems;
      // Scores of this thread's keys first (independent dots and shuffles overlap), then one
      // rescale of the running state per tile.
      float sc[kTileKeys];
      float tile_max = -INFINITY;
#pragma unroll
      for (int k = 0; k < kTileKeys; ++k) {
        if (k < per) {
          const int r = tz + k * bdz;
          float kf[kElems];
          load8(kt + r * D, kf);
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < kElems; ++i) dot = fmaf(q[i], kf[i], dot);
          for (int off = bdx / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          if constexpr (FP8) dot *= ksc_s[stage][r];
          sc[k] = valid_s[stage][r] ? dot * p.scale : -INFINITY;
          tile_max = fmaxf(tile_max, sc[k]);
        }
      }
      if (tile_max != -INFINITY) {
        const float m_new = fmaxf(m, tile_max);
        const float corr = expf(m - m_new);  // m = -inf at first: 0
        l *= corr;
#pragma unroll
        for (int i = 0; i < kElems; ++i) o[i] *= corr;
#pragma unroll
        for (int k = 0; k < kTileKeys; ++k) {
          if (k < per && sc[k] != -INFINITY) {
            const float w = expf(sc[k] - m_new);
            float vf[kElems];
            load8(vt + (tz + k * bdz) * D, vf);
            l += w;
            float wv = w;
            if constexpr (FP8) wv *= vsc_s[stage][tz + k * bdz];
#pragma unroll
            for (int i = 0; i < kElems; ++i) o[i] = fmaf(wv, vf[i], o[i]);
          }
        }
        m = m_new;
      }
      __syncthreads();  // the stage is consumed before the next iteration refills it
    }
    cp_async_wait<0>();

    if (bdz > 1) {
      float* ms = reinterpret_cast<float*>(smem + static_cast<size_t>(2) * STAGES * kTileKeys * D * sizeof(KV));
      float* ls = ms + bdz * G;
      float* os = ls + bdz * G;  // [bdz][G][D]
      if (tx == 0) {
        ms[tz * G + ty] = m;
        ls[tz * G + ty] = l;
      }
#pragma unroll
      for (int i = 0; i < kElems; ++i) os[(tz * G + ty) * D + tx * kElems + i] = o[i];
      __syncthreads();
      if (tz == 0) {
        float M = -INFINITY;
        for (int z = 0; z < bdz; ++z) M = fmaxf(M, ms[z * G + ty]);
        l = 0.f;
#pragma unroll
        for (int i = 0; i < kElems; ++i) o[i] = 0.f;
        for (int z = 0; z < bdz; ++z) {
          const float mz = ms[z * G + ty];
          if (mz == -INFINITY) continue;
          const float w = expf(mz - M);
          l += ls[z * G + ty] * w;
#pragma unroll
          for (int i = 0; i < kElems; ++i) o[i] += os[(z * G + ty) * D + tx * kElems + i] * w;
        }
        m = M;
      }
    }
    if (tz == 0) {
      const float inv = l > 0.f ? 1.0f / l : 0.f;
      if (p.num_chunks == 1) {
        T* dst = out + static_cast<int64_t>(t) * p.Hq * D + static_cast<int64_t>(head) * D + tx * kElems;
#pragma unroll
        for (int i = 0; i < kElems; ++i) dst[i] = from_f<T>(o[i] * inv);
      } else {
        float* dst = part_o + part * D + tx * kElems;
#pragma unroll
        for (int i = 0; i < kElems; ++i) dst[i] = o[i] * inv;
        if (tx == 0) part_lse[part] = l > 0.f ? m + logf(l) : -INFINITY;
      }
    }
  }
  if (p.counters == nullptr) return;

  // Fused merge: the last block of this (row, KV head) to finish reads every chunk's partials.
  __threadfence();
  __syncthreads();
  int* counter = p.counters + static_cast<int64_t>(ri) * p.Hkv + kvh;
  if (tid == 0) is_last = atomicAdd(counter, 1) == p.num_chunks - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int used = min(p.num_chunks, (n + p.chunk_tokens - 1) / p.chunk_tokens);
  float* w_s = reinterpret_cast<float*>(smem);  // [G][used]; the K/V stages are free now
  const int64_t head0 = static_cast<int64_t>(ri) * p.Hq + static_cast<int64_t>(kvh) * G;  // partials
  const int64_t out0 = static_cast<int64_t>(t) * p.Hq + static_cast<int64_t>(kvh) * G;   // out
  for (int i = tid; i < G * used; i += nthreads) {
    const int g = i / used, c = i - g * used;
    w_s[i] = __ldcg(part_lse + (head0 + g) * p.num_chunks + c);
  }
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31, warps = nthreads >> 5;
  for (int g = warp; g < G; g += warps) {
    float M = -INFINITY;
    for (int c = lane; c < used; c += 32) M = fmaxf(M, w_s[g * used + c]);
    M = warp_max(M);
    float L = 0.f;
    for (int c = lane; c < used; c += 32) {
      const float lse = w_s[g * used + c];
      const float e = lse == -INFINITY ? 0.f : expf(lse - M);  // every key of the chunk masked: 0
      w_s[g * used + c] = e;
      L += e;
    }
    L = warp_sum(L);
    const float inv = L > 0.f ? 1.0f / L : 0.f;
    for (int c = lane; c < used; c += 32) w_s[g * used + c] *= inv;
  }
  __syncthreads();
  // Four dims per thread, the chunks' loads unconditional (a masked chunk holds o = 0 with weight
  // 0) so that eight are in flight at a time.
  const int quads = D / 4;
  for (int i = tid; i < G * quads; i += nthreads) {
    const int g = i / quads, d4 = i - g * quads;
    const float4* po = reinterpret_cast<const float4*>(part_o + (head0 + g) * p.num_chunks * D) + d4;
    const float* w = w_s + g * used;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int c = 0; c < used; ++c) {
      const float4 v = __ldcg(po + c * quads);
      const float wc = w[c];
      acc.x = fmaf(wc, v.x, acc.x);
      acc.y = fmaf(wc, v.y, acc.y);
      acc.z = fmaf(wc, v.z, acc.z);
      acc.w = fmaf(wc, v.w, acc.w);
    }
    T* dst = out + (out0 + g) * D + d4 * 4;
    dst[0] = from_f<T>(acc.x);
    dst[1] = from_f<T>(acc.y);
    dst[2] = from_f<T>(acc.z);
    dst[3] = from_f<T>(acc.w);
  }
  if (tid == 0) *counter = 0;  // ready for the next launch (stream order)
}

// One block per (row, q head): out = sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M) over the
// chunks that hold keys of the row (a chunk whose keys are all masked has lse = -inf, weight 0).
// The weights go to shared memory first; then thread (quad, group) sums every kMergeGroups-th
// chunk of four dims, eight loads in flight, and the groups meet in shared memory.
constexpr int kMergeGroups = 4;
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(T* __restrict__ out,                 // [T, Hq * D]
                 const float* __restrict__ part_o,    // [R, Hq, num_chunks, D]
                 const float* __restrict__ part_lse,  // [R, Hq, num_chunks]
                 const int32_t* __restrict__ cu, const int32_t* __restrict__ lens,
                 const int32_t* __restrict__ rows,  // as GroupedParams::rows
                 int S, int Hq, int D, int num_chunks, int chunk_tokens) {
  __shared__ float w_s[kMaxChunks];
  __shared__ float red[32];
  __shared__ float4 acc_s[kMergeGroups][kMaxD / 4];
  const int ri = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int t = rows ? rows[ri] : ri;
  const int s = sequence_of(cu, S, t);
  if (s >= S || t >= cu[s + 1]) return;
  const int n = lens[s] - (cu[s + 1] - cu[s]) + (t - cu[s]) + 1;
  if (n <= 0) return;
  const int used = min(num_chunks, (n + chunk_tokens - 1) / chunk_tokens);
  const int64_t base = (static_cast<int64_t>(ri) * Hq + head) * num_chunks;
  float lse = -INFINITY;
  if (tid < used) lse = part_lse[base + tid];
  const float M = block_max(lse, red);
  const float e = tid < used && lse != -INFINITY ? expf(lse - M) : 0.f;
  const float L = block_sum(e, red);
  if (tid < used) w_s[tid] = L > 0.f ? e / L : 0.f;
  __syncthreads();
  const int quads = D / 4, quad = tid % quads, group = tid / quads;
  const int groups = min(kMergeGroups, kMergeThreads / quads);
  if (group < groups) {
    const float4* po = reinterpret_cast<const float4*>(part_o + base * D) + quad;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int c = group; c < used; c += groups) {
      const float4 v = po[static_cast<int64_t>(c) * quads];
      const float w = w_s[c];
      acc.x = fmaf(w, v.x, acc.x);
      acc.y = fmaf(w, v.y, acc.y);
      acc.z = fmaf(w, v.z, acc.z);
      acc.w = fmaf(w, v.w, acc.w);
    }
    acc_s[group][quad] = acc;
  }
  __syncthreads();
  if (group == 0) {
    float4 a = acc_s[0][quad];
    for (int g = 1; g < groups; ++g) {
      const float4 b = acc_s[g][quad];
      a.x += b.x;
      a.y += b.y;
      a.z += b.z;
      a.w += b.w;
    }
    T* dst = out + (static_cast<int64_t>(t) * Hq + head) * D + quad * 4;
    dst[0] = from_f<T>(a.x);
    dst[1] = from_f<T>(a.y);
    dst[2] = from_f<T>(a.z);
    dst[3] = from_f<T>(a.w);
  }
}

template <typename T>
constexpr int stages_for(int D) {
  // 64 KB of K/V stages: 4 deep for bf16/f16 at D = 256 (16 KB a stage), 2 for f32.
  return 2 * kTileKeys * D * static_cast<int>(sizeof(T)) * 4 <= (64 << 10) ? 4 : 2;
}

// Copies n bytes of host data to dst (device) through the context's pinned upload staging, as
// from_host_i32 does: asynchronously, in stream order; the staging bytes are reused only after a
// synchronisation. Only when the staging is full (MiBs of uploads since the last synchronisation:
// not in a model step) does this wait for the stream first, as from_host_i32 does.
void upload_staged(Context& c, void* dst, const void* src, size_t n, const char* op) {
  const size_t need = (n + 255) / 256 * 256;
  QUILT_ASSERT(need <= c.up_bytes, op, ": ", n, " bytes do not fit the upload staging of ", c.up_bytes);
  if (c.up_used + need > c.up_bytes) {
    check(cudaStreamSynchronize(c.stream), op);
    c.up_used = 0;
  }
  char* staged = static_cast<char*>(c.up_host) + c.up_used;
  std::memcpy(staged, src, n);
  check(cudaMemcpyAsync(dst, staged, n, cudaMemcpyHostToDevice, c.stream), op);
  c.up_used += need;
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
  const bool fp8 = k_cache.dtype() == DType::fp8_e4m3;  // kv_fp8.cuh; else the compute dtype
  expect(k_cache, fp8 ? DType::fp8_e4m3 : c.dtype, "paged_attention", "k_cache");
  expect(v_cache, k_cache.dtype(), "paged_attention", "v_cache");
  expect(cu_seqlens, DType::i32, "paged_attention", "cu_seqlens");
  expect(seqlens, DType::i32, "paged_attention", "seqlens");
  expect(block_tables, DType::i32, "paged_attention", "block_tables");
  const int64_t num_slots = k_cache.dim(0);
  QUILT_ASSERT(k_cache.numel() == num_slots * Hkv * D && v_cache.numel() == k_cache.numel());
  const float* k_scales = fp8 ? kv_fp8_scales(k_cache) : nullptr;
  const float* v_scales = fp8 ? kv_fp8_scales(v_cache) : nullptr;
  if (T == 0 || S == 0) return;

  // Prefill on tensor cores (prefill_attention.cu) when the caller gave host copies of cu_seqlens
  // and seqlens: every sequence with at least c.prefill_min_rows query rows is cut into tiles of
  // kPrefillTileRows rows, the longest key ranges first, and the rows of the other sequences
  // (decode, short chunks) go to the kernels below through a row list. The plan (tiles, then rows)
  // goes up through the pinned staging into the front of the scratch; the partials of a split
  // decode follow it. Without host copies (or for f32 and other shapes) every row takes the
  // kernels below, as before.
  std::vector<int32_t> plan;
  int64_t num_tiles = 0, R = T;  // R: rows for the decode kernels
  if (p.host_cu_seqlens != nullptr && p.host_seqlens != nullptr && c.prefill_min_rows > 0 &&
      prefill_attention_supported(c, out, qkv, k_cache, v_cache, p)) {
    const int32_t* hc = p.host_cu_seqlens;
    const int32_t* hl = p.host_seqlens;
    QUILT_ASSERT(p.num_seqs == S && hc[0] >= 0 && hc[S] <= T, "paged_attention: host copies of ", p.num_seqs,
                 " sequences for ", S, ", rows up to ", hc[S], " of ", T);
    struct Tile { int64_t keys; int32_t s, q0; };
    std::vector<Tile> tiles;
    std::vector<int32_t> rows;
    for (int64_t s = 0; s < S; ++s) {
      const int32_t q_len = hc[s + 1] - hc[s], ctx = hl[s];
      QUILT_ASSERT(q_len >= 0 && q_len <= ctx, "paged_attention: sequence ", s, " has ", q_len,
                   " query rows for a context of ", ctx);
      if (q_len >= c.prefill_min_rows) {
        for (int32_t q0 = 0; q0 < q_len; q0 += kPrefillTileRows)
          tiles.push_back(Tile{ctx - q_len + std::min(q0 + kPrefillTileRows, q_len), static_cast<int32_t>(s), q0});
      } else {
        for (int32_t t = hc[s]; t < hc[s + 1]; ++t) rows.push_back(t);
      }
    }
    if (!tiles.empty()) {
      std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.keys > b.keys; });
      num_tiles = static_cast<int64_t>(tiles.size());
      R = static_cast<int64_t>(rows.size());
      plan.reserve(2 * tiles.size() + rows.size());
      for (const Tile& t : tiles) {
        plan.push_back(t.s);
        plan.push_back(t.q0);
      }
      plan.insert(plan.end(), rows.begin(), rows.end());
    }
  }
  const size_t plan_bytes = (plan.size() * sizeof(int32_t) + 255) / 256 * 256;

  // Threads of the grouped kernel: bdx x G x bdz, 512 where the group allows; bdz (a power of two
  // <= kTileKeys) splits each tile's keys, so that the serial work per warp is short. Whole warps
  // only (the shuffles use full masks).
  const int64_t G = Hq / Hkv, bdx = D / kElems;
  int64_t bdz = 1;
  while (bdx * G * bdz < kMaxGroupThreads && bdz < kTileKeys) bdz *= 2;
  if (bdx * G * bdz > kMaxGroupThreads && bdz > 1) bdz /= 2;
  const bool grouped = D % kElems == 0 && bdx >= 8 && bdx <= 32 && (bdx & (bdx - 1)) == 0 &&
                       bdx * G * bdz <= kMaxGroupThreads && (bdx * G * bdz) % 32 == 0 && Hkv <= 65535 &&
                       aligned16(k_cache.data()) && aligned16(v_cache.data()) && c.grouped_attention &&
                       (!fp8 || D % 16 == 0);  // fp8 rows in 16-byte pieces

  // Split the context only when rows x KV heads leave SMs idle: aim at two blocks per SM, in
  // chunks of whole tiles. The longest context the tables can hold bounds every row's.
  const int64_t max_ctx = std::max<int64_t>(1, static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size);
  const int64_t base = R * Hkv, target = 2 * static_cast<int64_t>(c.num_sms);
  int64_t chunks = 1;
  if (grouped && R > 0 && base < target) {
    const int64_t max_chunks = (max_ctx + kTileKeys - 1) / kTileKeys;
    chunks = std::min<int64_t>({(target + base - 1) / base, max_chunks, kMaxChunks});
  }
  int64_t chunk_tokens = (max_ctx + chunks - 1) / chunks;
  chunk_tokens = (chunk_tokens + kTileKeys - 1) / kTileKeys * kTileKeys;
  chunks = (max_ctx + chunk_tokens - 1) / chunk_tokens;
  const int64_t parts = chunks > 1 ? R * Hq * chunks : 0;
  const size_t o_bytes = static_cast<size_t>(parts * D) * sizeof(float);
  const size_t scratch_bytes = plan_bytes + o_bytes + static_cast<size_t>(parts) * sizeof(float);
  char* ws = scratch_bytes > 0 ? static_cast<char*>(c.scratch(scratch_bytes, "paged_attention")) : nullptr;

  const int32_t* rows = nullptr;  // the decode kernels' row list, or null: every row
  if (num_tiles > 0) {
    upload_staged(c, ws, plan.data(), plan.size() * sizeof(int32_t), "paged_attention: plan");
    const int32_t* tiles = reinterpret_cast<const int32_t*>(ws);
    prefill_attention(c, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles, num_tiles, p);
    rows = tiles + 2 * num_tiles;
  }
  if (R == 0) return;

  if (!grouped) {
    dispatch(c.dtype, "paged_attention", [&](auto tag) {
      using T_ = decltype(tag);
      // KV_: the cache's storage type, T_ or e4m3 bytes (vector loads: 16 bytes of T_, 8 of e4m3).
      auto launch = [&](auto kv_tag) {
        using KV_ = decltype(kv_tag);
        constexpr int kVecKv = std::is_same_v<KV_, uint8_t> ? 8 : kVec<T_>;
        const bool vec = D % kVecKv == 0 && aligned16(k_cache.data());
        const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(Hq));
        auto kernel = vec ? rowhead_kernel<T_, KV_, true> : rowhead_kernel<T_, KV_, false>;
        kernel<<<grid, kThreads, 0, c.stream>>>(out.as<T_>(), qkv.as<T_>(), k_cache.as<KV_>(), v_cache.as<KV_>(),
                                                k_scales, v_scales, cu_seqlens.as<int32_t>(), seqlens.as<int32_t>(),
                                                block_tables.as<int32_t>(), rows, static_cast<int>(S),
                                                static_cast<int>(Hq), static_cast<int>(Hkv),
                                                static_cast<int>(D), p.block_size, p.max_blocks_per_seq,
                                                p.scale, num_slots);
      };
      if (fp8) launch(uint8_t{});
      else launch(T_{});
    });
    check_launch("paged_attention");
    return;
  }

  float* part_o = nullptr;
  float* part_lse = nullptr;
  const bool fused = chunks > 1 && chunks <= kMaxFusedChunks && base <= c.counter_count;
  if (chunks > 1) {
    part_o = reinterpret_cast<float*>(ws + plan_bytes);
    part_lse = reinterpret_cast<float*>(ws + plan_bytes + o_bytes);
  }
  const GroupedParams gp{static_cast<int>(S), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(D),
                         p.block_size, p.max_blocks_per_seq, static_cast<int>(chunk_tokens),
                         static_cast<int>(chunks), p.scale, num_slots, fused ? c.counters : nullptr, rows,
                         k_scales, v_scales};
  dispatch(c.dtype, "paged_attention", [&](auto tag) {
    using T_ = decltype(tag);
    // KV_: the cache's storage type, T_ or e4m3 bytes.
    auto launch = [&](auto kv_tag) {
      using KV_ = decltype(kv_tag);
      constexpr bool kFp8 = std::is_same_v<KV_, uint8_t>;
      const int stages = stages_for<KV_>(static_cast<int>(D));
      // K/V stages, then the bdz states; a fused merge reuses the front for its [G][chunks] weights.
      const size_t smem = std::max(static_cast<size_t>(2) * stages * kTileKeys * D * sizeof(KV_) +
                                       (bdz > 1 ? static_cast<size_t>(bdz * G * (2 + D)) * sizeof(float) : 0),
                                   static_cast<size_t>(G * chunks) * sizeof(float));
      auto kernel = stages == 4 ? grouped_kernel<T_, KV_, 4> : grouped_kernel<T_, KV_, 2>;
      // Above 48 KB a kernel must opt in; once per kernel and device (the context is per device).
      // Bits 0..5 for T_ caches, 20..25 for fp8 (prefill_attention.cu uses 8..19).
      const int type_index = std::is_same_v<T_, float> ? 0 : std::is_same_v<T_, __half> ? 1 : 2;
      const unsigned bit = 1u << ((kFp8 ? 20 : 0) + 2 * type_index + (stages == 4 ? 1 : 0));
      if (!(c.smem_opt_in & bit)) {
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 160 << 10),
              "paged_attention: shared memory opt-in");
        c.smem_opt_in |= bit;
      }
      const dim3 grid(static_cast<unsigned>(R), static_cast<unsigned>(Hkv), static_cast<unsigned>(chunks));
      const dim3 block(static_cast<unsigned>(bdx), static_cast<unsigned>(G), static_cast<unsigned>(bdz));
      kernel<<<grid, block, smem, c.stream>>>(out.as<T_>(), part_o, part_lse, qkv.as<T_>(), k_cache.as<KV_>(),
                                              v_cache.as<KV_>(), cu_seqlens.as<int32_t>(), seqlens.as<int32_t>(),
                                              block_tables.as<int32_t>(), gp);
    };
    if (fp8) launch(uint8_t{});
    else launch(T_{});
    check_launch("paged_attention");
    if (chunks > 1 && !fused) {
      const dim3 mgrid(static_cast<unsigned>(R), static_cast<unsigned>(Hq));
      merge_kernel<T_><<<mgrid, kMergeThreads, 0, c.stream>>>(
          out.as<T_>(), part_o, part_lse, cu_seqlens.as<int32_t>(), seqlens.as<int32_t>(), rows,
          static_cast<int>(S), static_cast<int>(Hq), static_cast<int>(D), static_cast<int>(chunks),
          static_cast<int>(chunk_tokens));
      check_launch("paged_attention merge");
    }
  });
}

}  // namespace quilt::cuda
