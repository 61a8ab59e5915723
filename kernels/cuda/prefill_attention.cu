#include "kernels/cuda/prefill_attention.h"

#include <type_traits>

#include "kernels/cuda/kv_fp8.cuh"

namespace quilt::cuda {
namespace {

// FlashAttention-2 style prefill over the paged cache, on tensor cores (mma.sync m16n8k16, bf16 or
// f16 operands, fp32 accumulators).
//
// One block of 4 warps per (q head, tile of kPrefillTileRows = 64 query rows of one sequence);
// warp w owns query rows [16 w, 16 w + 16) of the tile and keeps their whole fp32 output row
// (D/8 m16n8 accumulators: 128 registers a thread at D = 256) and its online-softmax state. The
// block walks the tile's keys [0, n_keys) in tiles of kBc keys (32 at D = 256, else 64):
//   S = Q K^T (fp32) -> scale, causal and cache masks -> m, l update in fp32 (exp2 with the scale
//   folded into log2 units) -> P rounded to T -> O += P V.
// This is FlashAttention's rounding: l sums the fp32 P, the MMA takes P rounded to bf16/f16.
//
// Shared memory (dynamic): Q [64][D], K [2][kBc][D], V [2][kBc][D], each row of 16-byte chunks
// stored at chunk ^ (row & 7) so that ldmatrix's 8 row addresses hit 8 different bank groups
// (D >= 64: at least 8 chunks a row). At D = 256: 32 + 32 + 32 = 96 KB, two blocks an SM.
// K/V tile t + 1 is loaded by cp.async (both stages double-buffered) while tile t is computed.
//
// Keys: row i (local) of a sequence with q_len rows and context ctx sees keys [0, ctx - q_len + i]
// (the op's causal rule); a key whose block-table entry is outside the cache (or negative) is
// loaded as zeros and masked, as in the decode kernels. A tile whose keys are all visible to
// every row and all in the cache skips the mask (the __syncthreads_and at the top of each step).
//
// An fp8 cache (KV = uint8_t, kv_fp8.cuh): cp.async double-buffers the e4m3 rows (and their scales)
// in a staging area instead, and at the top of each step the block converts the step's tile to T
// with its scales (e4m3 x scale rounded once to T) into single K and V tiles, laid out as above
// for ldmatrix. Shared memory stays the same: Q [64][D] T, K and V [kBc][D] T, staging
// [2][kBc][D] bytes for each of K and V.

constexpr int kRows = kPrefillTileRows;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
static_assert(kRows == 16 * kWarps, "a warp owns 16 query rows");

template <int D>
struct Cfg {
  static constexpr int kBc = D == 256 ? 32 : 64;        // keys per K/V tile
  static constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;  // rows one pass of the block loads
  static constexpr int kKvPasses = kBc / kRowsPerPass;
  static constexpr int kQPasses = kRows / kRowsPerPass;
  static constexpr size_t kSmem = static_cast<size_t>(kRows + 4 * kBc) * D * 2;
  // fp8 caches: 16-byte chunks of e4m3 rows in the staging area (D / 16 a row).
  static constexpr int kF8Chunks = D / 16;
  static constexpr int kF8RowsPerPass = kThreads / kF8Chunks;
  static constexpr int kF8Passes = kBc / kF8RowsPerPass;
  static_assert(D == 64 || D == 128 || D == 256, "head_dim 64, 128 or 256");
  static_assert(kThreads % kChunks == 0 && kBc % kRowsPerPass == 0 && kRows % kRowsPerPass == 0, "load passes");
  static_assert(kThreads % kF8Chunks == 0 && kBc % kF8RowsPerPass == 0, "fp8 load passes");
  // Q + 2 K/V stages of T = Q + single K/V tiles of T + 2 K/V stages of e4m3.
  static_assert(kSmem == static_cast<size_t>(kRows * D * 2 + 2 * kBc * D * 2 + 4 * kBc * D), "fp8 layout");
};

struct PrefillParams {
  int Hq, Hkv, block_size, max_blocks;
  float scale_log2;  // softmax scale * log2(e)
  int64_t num_slots;
  const float* k_scales;  // [Hkv, num_slots]: fp8 caches only
  const float* v_scales;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `ch` of row `row` in a swizzled [rows][D] tile.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int ch) {
  return static_cast<uint32_t>((row * Cfg<D>::kChunks + (ch ^ (row & 7))) * 16);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a b (m16n8k16, row-major A, column-major B, fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(kThreads, 2)
    prefill_kernel(T* __restrict__ out,                 // [T, Hq * D]
                   const T* __restrict__ qkv,           // [T, (Hq + 2 Hkv) * D]
                   const KV* __restrict__ k_cache,      // [slots, Hkv, D]
                   const KV* __restrict__ v_cache,      // [slots, Hkv, D]
                   const int32_t* __restrict__ cu,      // [S + 1]
                   const int32_t* __restrict__ lens,    // [S]
                   const int32_t* __restrict__ tables,  // [S, max_blocks]
                   const int32_t* __restrict__ tiles,   // [num_tiles, 2]: sequence, first local row
                   PrefillParams p) {
  using C = Cfg<D>;
  constexpr int kBc = C::kBc, kChunks = C::kChunks;
  constexpr bool FP8 = std::is_same_v<KV, uint8_t>;
  constexpr int kKvStages = FP8 ? 1 : 2;  // T tiles of K and V (fp8: converted from the staging)
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ unsigned char valid_s[2][kBc];
  __shared__ __align__(16) float ksc_s[FP8 ? 2 : 1][kBc];  // fp8: the staged keys' scales
  __shared__ __align__(16) float vsc_s[FP8 ? 2 : 1][kBc];

  const int h = blockIdx.x, tile = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int s = tiles[2 * tile], q0 = tiles[2 * tile + 1];
  const int q_begin = cu[s], q_len = cu[s + 1] - q_begin, ctx = lens[s];
  const int rows = min(kRows, q_len - q0);  // query rows of this tile
  const int past = ctx - q_len;             // keys before the sequence's first query row
  const int n_keys = past + q0 + rows;      // keys [0, n_keys) are visible to some row of the tile
  if (rows <= 0 || past < 0) return;        // the host checks both; never reached
  const int kvh = h / (p.Hq / p.Hkv);
  const int64_t row_stride = static_cast<int64_t>(p.Hq + 2 * p.Hkv) * D;
  const int32_t* table = tables + static_cast<int64_t>(s) * p.max_blocks;

  const uint32_t q_base = smem_addr(smem);
  const uint32_t k_base = q_base + kRows * D * 2;
  const uint32_t v_base = k_base + kKvStages * kBc * D * 2;
  // fp8 staging: K stages [2][kBc][D] bytes, then V stages, unswizzled.
  constexpr int kF8Offset = kRows * D * 2 + 2 * kKvStages * kBc * D * 2;
  const int ld_row = tid / kChunks, ld_ch = tid % kChunks;  // this thread's chunk of each load pass

  // Q rows of the tile; rows past q_len are zeros (finite scores, never stored).
  {
    const T* qg = qkv + static_cast<int64_t>(q_begin + q0) * row_stride + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int k = 0; k < C::kQPasses; ++k) {
      const int r = ld_row + k * C::kRowsPerPass;
      const bool ok = r < rows;
      cp_async16(q_base + swz<D>(r, ld_ch), ok ? qg + r * row_stride + ld_ch * 8 : qkv, ok);
    }
  }
  // K/V tile `kt` into stage `st`; returns whether every key this thread loaded is in the cache
  // and below n_keys (the block's AND of it says whether the tile needs the cache mask).
  auto load_kv_fp8 = [&](int kt, int st) {
    bool all = true;
    const int row8 = tid / C::kF8Chunks, ch8 = tid % C::kF8Chunks;
#pragma unroll
    for (int k = 0; k < C::kF8Passes; ++k) {
      const int r = row8 + k * C::kF8RowsPerPass;
      const int j = kt * kBc + r;
      int64_t slot = -1;
      if (j < n_keys) {
        const int bi = j / p.block_size;
        if (bi < p.max_blocks) {
          const int32_t b = table[bi];
          const int64_t sl = static_cast<int64_t>(b) * p.block_size + (j - bi * p.block_size);
          if (b >= 0 && sl < p.num_slots) slot = sl;
        }
      }
      const bool ok = slot >= 0;
      all = all && ok;
      if (ch8 == 0) {
        valid_s[st][r] = ok;
        const int64_t at = static_cast<int64_t>(kvh) * p.num_slots + slot;
        cp_async4(&ksc_s[FP8 ? st : 0][r], ok ? p.k_scales + at : p.k_scales, ok);
        cp_async4(&vsc_s[FP8 ? st : 0][r], ok ? p.v_scales + at : p.v_scales, ok);
      }
      const int64_t off = ok ? (slot * p.Hkv + kvh) * D + ch8 * 16 : 0;
      const uint32_t at = q_base + static_cast<uint32_t>(kF8Offset + (st * kBc + r) * D + ch8 * 16);
      cp_async16(at, k_cache + off, ok);
      cp_async16(at + 2 * kBc * D, v_cache + off, ok);
    }
    return all;
  };
  auto load_kv = [&](int kt, int st) {
    if constexpr (FP8) return load_kv_fp8(kt, st);
    else {
    bool all = true;
#pragma unroll
    for (int k = 0; k < C::kKvPasses; ++k) {
      const int r = ld_row + k * C::kRowsPerPass;
      const int j = kt * kBc + r;
      int64_t off = -1;
      if (j < n_keys) {
        const int bi = j / p.block_size;
        if (bi < p.max_blocks) {
          const int32_t b = table[bi];
          const int64_t slot = static_cast<int64_t>(b) * p.block_size + (j - bi * p.block_size);
          if (b >= 0 && slot < p.num_slots) off = (slot * p.Hkv + kvh) * D + ld_ch * 8;
        }
      }
      const bool ok = off >= 0;
      all = all && ok;
      if (ld_ch == 0) valid_s[st][r] = ok;
      const uint32_t at = static_cast<uint32_t>(st * kBc * D * 2) + swz<D>(r, ld_ch);
      cp_async16(k_base + at, ok ? k_cache + off : k_cache, ok);
      cp_async16(v_base + at, ok ? v_cache + off : v_cache, ok);
    }
    return all;
    }
  };

  const int num_kt = (n_keys + kBc - 1) / kBc;
  bool cur_valid = load_kv(0, 0);
  cp_async_commit();  // group 0: Q and K/V tile 0

  const int g = lane >> 2, c4 = lane & 3;        // accumulator row g (and g + 8), columns 2 c4, 2 c4 + 1
  const int row0 = q0 + warp * 16 + g;           // local query row of accumulator row g
  const int lim0 = past + row0, lim1 = lim0 + 8;  // last visible key of rows g and g + 8
  const int first_limit = past + q0;             // the tile's first row sees keys [0, first_limit]

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // log2 units; l: this thread's part

  // ldmatrix lane addresses (see the fragment layouts of mma.m16n8k16):
  //  Q (A, x4): rows 16 w + (lane & 15), chunk 2 kk + (lane >> 4);
  //  K (B of two n-tiles, x4): key 16 np + (lane & 7) + 8 (lane >> 4), chunk 2 kk + ((lane >> 3) & 1);
  //  V (B of two d-tiles, x4.trans): key 16 kk + (lane & 7) + 8 ((lane >> 3) & 1), chunk 2 dp + (lane >> 4).
  const int q_row = warp * 16 + (lane & 15), q_ch = lane >> 4;
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_ch = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3), v_ch = lane >> 4;

  for (int kt = 0; kt < num_kt; ++kt) {
    const int st = kt & 1;
    bool next_valid = true;
    if (kt + 1 < num_kt) next_valid = load_kv(kt + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile kt (and Q) have landed
    const bool tile_valid = __syncthreads_and(cur_valid) != 0;  // ... and every thread's
    cur_valid = next_valid;
    if constexpr (FP8) {
      // Staged e4m3 tile kt -> T tiles: thread chunk (row, 8 values) as in the T loads, times the
      // row's scale (0 for masked keys, whose bytes are zeros). The tiles were last read before the
      // previous step's closing barrier.
#pragma unroll
      for (int k = 0; k < C::kKvPasses; ++k) {
        const int r = ld_row + k * C::kRowsPerPass;
        const unsigned char* src = smem + kF8Offset + (st * kBc + r) * D + ld_ch * 8;
        const uint32_t at = swz<D>(r, ld_ch);
        float f[8];
        fp8x8_to_floats(*reinterpret_cast<const uint2*>(src), f);
        const float ksc = ksc_s[st][r];
        *reinterpret_cast<uint4*>(smem + (k_base - q_base) + at) =
            make_uint4(pack2<T>(f[0] * ksc, f[1] * ksc), pack2<T>(f[2] * ksc, f[3] * ksc),
                       pack2<T>(f[4] * ksc, f[5] * ksc), pack2<T>(f[6] * ksc, f[7] * ksc));
        fp8x8_to_floats(*reinterpret_cast<const uint2*>(src + 2 * kBc * D), f);
        const float vsc = vsc_s[st][r];
        *reinterpret_cast<uint4*>(smem + (v_base - q_base) + at) =
            make_uint4(pack2<T>(f[0] * vsc, f[1] * vsc), pack2<T>(f[2] * vsc, f[3] * vsc),
                       pack2<T>(f[4] * vsc, f[5] * vsc), pack2<T>(f[6] * vsc, f[7] * vsc));
      }
      __syncthreads();
    }
    const uint32_t ks = k_base + static_cast<uint32_t>((FP8 ? 0 : st) * kBc * D * 2);
    const uint32_t vs = v_base + static_cast<uint32_t>((FP8 ? 0 : st) * kBc * D * 2);

    // S = Q K^T for this warp's 16 rows and the tile's kBc keys.
    float sc[kBc / 8][4];
#pragma unroll
    for (int n = 0; n < kBc / 8; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, q_base + swz<D>(q_row, 2 * kk + q_ch));
#pragma unroll
      for (int np = 0; np < kBc / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, ks + swz<D>(16 * np + k_row, 2 * kk + k_ch));
        mma<T>(sc[2 * np], a, b[0], b[1]);
        mma<T>(sc[2 * np + 1], a, b[2], b[3]);
      }
    }

    // Scale to log2 units; mask keys past a row's causal limit and keys outside the cache.
    const int j0 = kt * kBc;
    const bool need_mask = !tile_valid || j0 + kBc - 1 > first_limit;
#pragma unroll
    for (int n = 0; n < kBc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = sc[n][e] * p.scale_log2;
        if (need_mask) {
          const int jj = n * 8 + 2 * c4 + (e & 1);
          if (!valid_s[st][jj] || j0 + jj > (e < 2 ? lim0 : lim1)) v = -INFINITY;
        }
        sc[n][e] = v;
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < kBc / 8; ++n) {
      mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
      mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
    }
    // A row lives in the 4 threads of a quad.
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A row with every key so far masked keeps m = -inf: subtract 0 instead (p = 0, corr = 0).
    const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
    const float corr0 = exp2f(m0 - b0), corr1 = exp2f(m1 - b1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < kBc / 8; ++n) {
      sc[n][0] = exp2f(sc[n][0] - b0);
      sc[n][1] = exp2f(sc[n][1] - b0);
      sc[n][2] = exp2f(sc[n][2] - b1);
      sc[n][3] = exp2f(sc[n][3] - b1);
      sum0 += sc[n][0] + sc[n][1];
      sum1 += sc[n][2] + sc[n][3];
    }
    l0 = l0 * corr0 + sum0;
    l1 = l1 * corr1 + sum1;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[i][0] *= corr0;
      o[i][1] *= corr0;
      o[i][2] *= corr1;
      o[i][3] *= corr1;
    }

    // O += P V: the S accumulators of key tiles 2 kk and 2 kk + 1 are the A fragment of step kk.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                             pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, vs + swz<D>(16 * kk + v_row, 2 * dp + v_ch));
        mma<T>(o[2 * dp], a, b[0], b[1]);
        mma<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with stage st (and valid_s[st]) before it is refilled
  }
  cp_async_wait<0>();  // only empty groups can be pending; keep the exit clean anyway

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int64_t out_stride = static_cast<int64_t>(p.Hq) * D;
  T* ob = out + static_cast<int64_t>(q_begin) * out_stride + static_cast<int64_t>(h) * D + 2 * c4;
  if (row0 < q_len) {
    T* dst = ob + row0 * out_stride;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(dst + 8 * i) = pack2<T>(o[i][0] * inv0, o[i][1] * inv0);
  }
  if (row0 + 8 < q_len) {
    T* dst = ob + (row0 + 8) * out_stride;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(dst + 8 * i) = pack2<T>(o[i][2] * inv1, o[i][3] * inv1);
  }
}

template <typename T, typename KV, int D>
void launch(Context& c, Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
            const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables, const int32_t* tiles,
            int64_t num_tiles, const PrefillParams& pp) {
  constexpr size_t smem = Cfg<D>::kSmem;
  auto kernel = prefill_kernel<T, KV, D>;
  // Above 48 KB a kernel must opt in; once per kernel and device. Bits 8..13 of smem_opt_in, 14..19
  // with an fp8 cache (paged_attention.cu's grouped kernel uses 0..5 and 20..25).
  const unsigned bit = 1u << (8 + (std::is_same_v<KV, uint8_t> ? 6 : 0) + (std::is_same_v<T, __half> ? 0 : 3) +
                              (D == 64 ? 0 : D == 128 ? 1 : 2));
  if (!(c.smem_opt_in & bit)) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
          "paged_attention: prefill shared memory opt-in");
    c.smem_opt_in |= bit;
  }
  const dim3 grid(static_cast<unsigned>(pp.Hq), static_cast<unsigned>(num_tiles));
  kernel<<<grid, kThreads, smem, c.stream>>>(out.as<T>(), qkv.as<T>(), k_cache.as<KV>(), v_cache.as<KV>(),
                                             cu_seqlens.as<int32_t>(), seqlens.as<int32_t>(),
                                             block_tables.as<int32_t>(), tiles, pp);
  check_launch("paged_attention prefill");
}

template <typename T, typename KV>
void launch_d(Context& c, int D, Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
              const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables, const int32_t* tiles,
              int64_t num_tiles, const PrefillParams& pp) {
  switch (D) {
    case 64: return launch<T, KV, 64>(c, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles, num_tiles, pp);
    case 128: return launch<T, KV, 128>(c, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles, num_tiles, pp);
    case 256: return launch<T, KV, 256>(c, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles, num_tiles, pp);
  }
  QUILT_ASSERT(false, "paged_attention prefill: head_dim ", D);
}

}  // namespace

bool prefill_attention_supported(const Context& c, const Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                                 const Tensor& v_cache, const AttentionParams& p) {
  return (c.dtype == DType::bf16 || c.dtype == DType::f16) &&
         (k_cache.dtype() == c.dtype || k_cache.dtype() == DType::fp8_e4m3) && v_cache.dtype() == k_cache.dtype() &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) && p.num_q_heads <= 65535 &&
         aligned16(out.data()) && aligned16(qkv.data()) && aligned16(k_cache.data()) && aligned16(v_cache.data());
}

void prefill_attention(Context& c, Tensor& out, const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& cu_seqlens, const Tensor& seqlens, const Tensor& block_tables,
                       const int32_t* tiles, int64_t num_tiles, const AttentionParams& p) {
  QUILT_ASSERT(prefill_attention_supported(c, out, qkv, k_cache, v_cache, p) && num_tiles > 0 &&
                   num_tiles <= 65535,
               "paged_attention prefill: ", num_tiles, " tiles of ", p.num_q_heads, " heads of ", p.head_dim);
  constexpr float kLog2e = 1.4426950408889634f;
  const bool fp8 = k_cache.dtype() == DType::fp8_e4m3;
  const PrefillParams pp{p.num_q_heads, p.num_kv_heads, p.block_size, p.max_blocks_per_seq, p.scale * kLog2e,
                         k_cache.dim(0), fp8 ? kv_fp8_scales(k_cache) : nullptr, fp8 ? kv_fp8_scales(v_cache) : nullptr};
  if (c.dtype == DType::bf16) {
    if (fp8)
      launch_d<__nv_bfloat16, uint8_t>(c, p.head_dim, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables,
                                       tiles, num_tiles, pp);
    else
      launch_d<__nv_bfloat16, __nv_bfloat16>(c, p.head_dim, out, qkv, k_cache, v_cache, cu_seqlens, seqlens,
                                             block_tables, tiles, num_tiles, pp);
  } else {
    if (fp8)
      launch_d<__half, uint8_t>(c, p.head_dim, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles,
                                num_tiles, pp);
    else
      launch_d<__half, __half>(c, p.head_dim, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, tiles,
                               num_tiles, pp);
  }
}

}  // namespace quilt::cuda
