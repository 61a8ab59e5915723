#include <algorithm>
#include <climits>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"
#include "runtime/core/log.h"

// y[M, N] = x[M, K] w[N, K]^T (+ y). Decode (M <= 8, bf16/f16) is a GEMV bound by the weight
// bytes; it has several kernels (kGemvKernels), and the one that is fastest for a shape, from a
// cold L2 as in a decode step, is picked once per (M, N, K) against cuBLAS (pick_gemv).
namespace quilt::cuda {
namespace {

__device__ __forceinline__ uint4 load_stream(const void* p) {
  // Weights are read once per step and do not fit in L2: keep them out of L1.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f(e[i]);
}

// ---- "rowwarp": the stage-2 GEMV (CUDA cores, a warp per weight row) ------------------------

constexpr int kRowThreads = 256;
constexpr int kRowUnroll = 8;  // 16-byte weight loads in flight per lane

// A block of 8 warps takes 8 / wpr rows; the wpr warps of a row split K (wpr > 1 for long rows
// such as down's, so that each warp has one batch of loads to wait for), each streaming its slice
// with 16-byte loads, kRowUnroll in flight per lane, into M fp32 accumulators; x (M x K, a few
// KB) is read through L1. The warps' sums meet in shared memory. One rounding per output, of
// acc + y when accumulating, as cuBLAS's beta = 1. One row group per block, no grid-stride.
template <typename T, int M>
__global__ void __launch_bounds__(kRowThreads)
    gemv_rowwarp_kernel(T* __restrict__ y,        // [M, N]
                        const T* __restrict__ x,  // [M, K]
                        const T* __restrict__ w,  // [N, K]
                        int N, int K, int wpr, int k_slice, bool accumulate) {
  __shared__ float red[kRowThreads / 32][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rows_per_block = (kRowThreads / 32) / wpr;
  const int n = blockIdx.x * rows_per_block + warp / wpr;
  const int part = warp % wpr;
  constexpr int kStep = 32 * 8;  // elements of a row per warp-wide 16-byte load
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  if (n < N) {
    const T* wr = w + static_cast<int64_t>(n) * K;
    const int k_end = min(K, (part + 1) * k_slice);
    for (int k0 = part * k_slice + lane * 8; k0 < k_end; k0 += kStep * kRowUnroll) {
      uint4 wv[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int k = k0 + u * kStep;
        wv[u] = k < k_end ? load_stream(wr + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const int k = k0 + u * kStep;
        if (k < k_end) {
          float wf[8];
          unpack8<T>(wv[u], wf);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float xf[8];
            unpack8<T>(*reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k), xf);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (wpr > 1) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) red[warp][m] = acc[m];
    }
    __syncthreads();
    if (part != 0) return;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int q = 0; q < wpr; ++q) sum += red[warp + q][m];
      acc[m] = sum;
    }
  }
  if (lane == 0 && n < N) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      T* out = y + static_cast<int64_t>(m) * N + n;
      *out = from_f<T>(accumulate ? acc[m] + to_f(*out) : acc[m]);
    }
  }
}

template <typename T, int M>
void launch_rowwarp(Context& c, T* y, const T* x, const T* w, int N, int K, bool accumulate) {
  // Warps per row: one per 2048 elements (one batch of loads per lane), at most the block's 8.
  int wpr = 1;
  while (wpr < kRowThreads / 32 && K > wpr * 2048) wpr *= 2;
  constexpr int kStep = 32 * 8;  // a warp-wide 16-byte load
  const int k_slice = ((K + wpr - 1) / wpr + kStep - 1) / kStep * kStep;
  const int rows_per_block = (kRowThreads / 32) / wpr;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  gemv_rowwarp_kernel<T, M><<<static_cast<unsigned>(blocks), kRowThreads, 0, c.stream>>>(y, x, w, N, K, wpr, k_slice,
                                                                                       accumulate);
}

template <typename T>
void rowwarp(Context& c, T* y, const T* x, const T* w, int M, int N, int K, bool accumulate) {
  switch (M) {
    case 1: return launch_rowwarp<T, 1>(c, y, x, w, N, K, accumulate);
    case 2: return launch_rowwarp<T, 2>(c, y, x, w, N, K, accumulate);
    case 3: return launch_rowwarp<T, 3>(c, y, x, w, N, K, accumulate);
    case 4: return launch_rowwarp<T, 4>(c, y, x, w, N, K, accumulate);
    case 5: return launch_rowwarp<T, 5>(c, y, x, w, N, K, accumulate);
    case 6: return launch_rowwarp<T, 6>(c, y, x, w, N, K, accumulate);
    case 7: return launch_rowwarp<T, 7>(c, y, x, w, N, K, accumulate);
    case 8: return launch_rowwarp<T, 8>(c, y, x, w, N, K, accumulate);
  }
  QUILT_ASSERT(false, "gemv: M = ", M);
}

// ---- "mma": tensor-core GEMV with a cp.async ring per thread (PDL) --------------------------
//
// Work: tiles of 16 weight rows. A block of W warps owns tiles blockIdx.x, + gridDim.x, ... (the
// grid is at most one resident wave: persistent), and its warps split each tile's K: warp q
// takes steps [q * spw, (q + 1) * spw) of 64 elements. In a step, lane (g = lane / 4, t = lane % 4)
// reads 16 bytes at k = step * 64 + v * 32 + t * 8 (v = 0, 1) of rows g and g + 8 of the tile
// (P_v, Q_v) and of x row g (X_v, when g < M): a quad reads 128 contiguous bytes of a row per step.
// Those are the operands of two mma.m16n8k16 (fp32 accumulators) per v, with no shuffles: the
// fragment layout wants, in lane (g, t), A rows g / g + 8 at k slots {2t, 2t+1, 2t+8, 2t+9} and B
// column g (= x row g) at the same slots; lane (g, t) fills those slots with 4 consecutive k of
// its own 16 bytes (P.x, P.y: slots 2t..2t+1, 2t+8..2t+9 of the first mma; P.z, P.w of the second)
// and so does every other lane with the same t, for the rows and for x alike. A dot product does
// not care which k sits in which slot as long as A and B agree, so D[row][m] = sum_k w[row][k]
// x[m][k] over the 64 k of the step. Rows >= N, k >= K and x rows >= M read as zeros.
//
// Each thread moves its own bytes with cp.async (weights .cg with an L2 evict-first policy, x
// .ca) into its own slots of an S-deep shared-memory ring, and reads back only what it copied:
// no block barrier in the stream, S steps (S x 2 KB of weights per warp) always in flight, also
// across tile boundaries. At the end of a tile, the W warps' accumulators meet in shared memory
// (two buffers, so one barrier per tile) and 128 threads sum them in warp order and store: one
// rounding per output, of sum + y when accumulating. Deterministic.
//
// PDL: before pdl_wait the kernel only prefetches its first S steps of weights into L2.

constexpr int kStepK = 64;  // elements of K per step

template <int W, int S>
constexpr size_t mma_smem_bytes() {
  return static_cast<size_t>(S) * 6 * W * 32 * sizeof(uint4) + 2 * static_cast<size_t>(W) * 128 * sizeof(float);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_weights(void* dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "l"(policy)
               : "memory");
}
__device__ __forceinline__ void cp_async_x(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <typename T, int W, int S>
__global__ void __launch_bounds__(W * 32)
    gemv_mma_kernel(T* __restrict__ y,        // [M, N]
                    const T* __restrict__ x,  // [M, K]
                    const T* __restrict__ w,  // [N, K]
                    int M, int N, int K, int spw, int tiles, bool accumulate) {
  static_assert(W >= 4, "128 threads sum a tile");
  constexpr int NT = W * 32;
  extern __shared__ uint4 smem[];
  uint4* ring = smem;                                          // [S][6][NT]: P0 P1 Q0 Q1 X0 X1
  float* red = reinterpret_cast<float*>(smem + S * 6 * NT);  // [2][W][16 rows x 8 columns]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int G = static_cast<int>(gridDim.x);
  const int first_tile = static_cast<int>(blockIdx.x);  // < tiles: the grid has at most `tiles` blocks
  const int total = ((tiles - 1 - first_tile) / G + 1) * spw;  // steps of every warp of this block
  const int k_lane = warp * spw * kStepK + t * 8;             // this lane's first k in a tile (v = 0)
  const bool has_x = g < M;
  const T* xg = x + static_cast<int64_t>(has_x ? g : 0) * K;

  // Before the previous kernel has finished: only L2 prefetches of the first S steps' weights
  // (a line per row and step: the quad's 128 bytes).
  {
    int tile = first_tile, j = 0;
    for (int s = 0; s < S && s < total; ++s) {
      const int k = k_lane + j * kStepK;
      const int64_t r0 = static_cast<int64_t>(tile) * 16 + g;
      if (k < K && r0 < N) prefetch_l2(w + r0 * K + k);
      if (k < K && r0 + 8 < N) prefetch_l2(w + (r0 + 8) * K + k);
      if (++j == spw) {
        j = 0;
        tile += G;
      }
    }
  }
  pdl_launch_dependents();
  pdl_wait();

  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));

  int is_tile = first_tile, is_j = 0;  // the next step to issue
  auto issue = [&](int slot) {
    uint4* base = ring + slot * 6 * NT + tid;
    const int64_t r0 = static_cast<int64_t>(is_tile) * 16 + g;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int k = k_lane + is_j * kStepK + v * 32;
      if (k < K) {
        if (r0 < N) cp_async_weights(base + v * NT, w + r0 * K + k, policy);
        if (r0 + 8 < N) cp_async_weights(base + (2 + v) * NT, w + (r0 + 8) * K + k, policy);
        if (has_x) cp_async_x(base + (4 + v) * NT, xg + k);
      }
    }
    if (++is_j == spw) {
      is_j = 0;
      is_tile += G;
    }
  };

#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (s < total) issue(s);
    cp_async_commit();  // empty groups keep the count: group i holds step i
  }

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int tile = first_tile, j = 0, buf = 0;  // the step being computed
  for (int i = 0; i < total; ++i) {
    const int slot = i % S;
    cp_async_wait<S - 1>();  // groups 0..i are complete (S + i committed)
    const uint4* base = ring + slot * 6 * NT + tid;
    const int64_t r0 = static_cast<int64_t>(tile) * 16 + g;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int k = k_lane + j * kStepK + v * 32;
      const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
      // The same conditions as in issue(): what was not copied reads as zeros.
      const uint4 P = k < K && r0 < N ? base[v * NT] : zero;
      const uint4 Q = k < K && r0 + 8 < N ? base[(2 + v) * NT] : zero;
      const uint4 X = k < K && has_x ? base[(4 + v) * NT] : zero;
      mma_16816<T>(acc, P.x, Q.x, P.y, Q.y, X.x, X.y);
      mma_16816<T>(acc, P.z, Q.z, P.w, Q.w, X.z, X.w);
    }
    // The slot just read is refilled with step i + S: this thread's reads of it are complete
    // (the mma above consumed them), and no other thread touches this thread's slots.
    if (i + S < total) issue(slot);
    cp_async_commit();
    if (++j == spw) {  // the tile is done (block-uniform)
      // acc: rows g and g + 8 of the tile, columns (x rows) 2t and 2t + 1.
      float* r = red + (buf * W + warp) * 128;
      *reinterpret_cast<float2*>(r + g * 8 + 2 * t) = make_float2(acc[0], acc[1]);
      *reinterpret_cast<float2*>(r + (g + 8) * 8 + 2 * t) = make_float2(acc[2], acc[3]);
      // One barrier per tile: buffer buf is written again two tiles later, after every thread
      // has passed the next tile's barrier, so after the readers below are done with it.
      __syncthreads();
      if (tid < 128) {
        const float* rr = red + buf * W * 128 + tid;
        float sum = 0.f;
#pragma unroll
        for (int q = 0; q < W; ++q) sum += rr[q * 128];
        const int row = tid >> 3, col = tid & 7;
        const int64_t n = static_cast<int64_t>(tile) * 16 + row;
        if (col < M && n < N) {
          T* out = y + static_cast<int64_t>(col) * N + n;
          *out = from_f<T>(accumulate ? sum + to_f(*out) : sum);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] = 0.f;
      buf ^= 1;
      j = 0;
      tile += G;
    }
  }
  cp_async_wait<0>();
}

// Blocks of gemv_mma_kernel<T, W, S> resident per SM on this device (0: it does not fit), with
// its shared-memory opt-in done. Once per device and kernel.
template <typename T, int W, int S>
int mma_blocks_per_sm(Context& c) {
  static std::mutex mu;
  static std::map<int, int> per_device;
  std::lock_guard<std::mutex> lock(mu);
  if (const auto it = per_device.find(c.device); it != per_device.end()) return it->second;
  constexpr size_t smem = mma_smem_bytes<W, S>();
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c.device), "matmul (gemv)");
  int blocks = 0;
  if (smem <= static_cast<size_t>(optin)) {
    check(cudaFuncSetAttribute(gemv_mma_kernel<T, W, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "matmul (gemv): shared memory opt-in");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gemv_mma_kernel<T, W, S>, W * 32, smem),
          "matmul (gemv): occupancy");
  }
  per_device[c.device] = blocks;
  return blocks;
}

template <typename T, int W, int S>
bool mma_fits(Context& c) {
  return mma_blocks_per_sm<T, W, S>(c) > 0;
}

template <typename T, int W, int S>
void launch_mma(Context& c, T* y, const T* x, const T* w, int M, int N, int K, bool accumulate) {
  const int per_sm = mma_blocks_per_sm<T, W, S>(c);
  QUILT_ASSERT(per_sm > 0, "gemv mma kernel (", W, " warps, ", S, " stages) does not fit on device ", c.device);
  const int tiles = (N + 15) / 16;
  const int steps = (K + kStepK - 1) / kStepK;
  const int spw = std::max(1, (steps + W - 1) / W);  // K = 0: one step of zeros, y = 0 (+ y)
  const int grid = static_cast<int>(std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * c.num_sms));
  launch_pdl(c, "matmul (gemv)", gemv_mma_kernel<T, W, S>, dim3(grid), dim3(W * 32), mma_smem_bytes<W, S>(), y, x, w,
             M, N, K, spw, tiles, accumulate);
}

// ---- the kernel table --------------------------------------------------------------------

struct GemvKernel {
  const char* name;
  bool pdl;  // launched with PDL (its launch and first weight reads overlap the previous kernel)
  // Whether it can run here, and the launch, per storage type.
  bool (*fits_bf16)(Context&);
  bool (*fits_f16)(Context&);
  void (*run_bf16)(Context&, __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, int, int, int, bool);
  void (*run_f16)(Context&, __half*, const __half*, const __half*, int, int, int, bool);
};

bool always(Context&) { return true; }

constexpr int kDefaultGemv = 1;  // without tuning (gemv_autotune = false)
const GemvKernel kGemvKernels[] = {
    {"rowwarp", false, always, always, rowwarp<__nv_bfloat16>, rowwarp<__half>},
    {"mma w8 s4", true, mma_fits<__nv_bfloat16, 8, 4>, mma_fits<__half, 8, 4>, launch_mma<__nv_bfloat16, 8, 4>,
     launch_mma<__half, 8, 4>},
    {"mma w8 s8", true, mma_fits<__nv_bfloat16, 8, 8>, mma_fits<__half, 8, 8>, launch_mma<__nv_bfloat16, 8, 8>,
     launch_mma<__half, 8, 8>},
    {"mma w16 s4", true, mma_fits<__nv_bfloat16, 16, 4>, mma_fits<__half, 16, 4>, launch_mma<__nv_bfloat16, 16, 4>,
     launch_mma<__half, 16, 4>},
};
constexpr int kNumGemv = static_cast<int>(sizeof(kGemvKernels) / sizeof(kGemvKernels[0]));
constexpr int kCublas = -1;

bool gemv_fits(Context& c, int k) {
  return c.dtype == DType::bf16 ? kGemvKernels[k].fits_bf16(c) : kGemvKernels[k].fits_f16(c);
}

void run_gemv(Context& c, int kernel, void* y, const void* x, const void* w, int m, int n, int k, bool accumulate) {
  const GemvKernel& g = kGemvKernels[kernel];
  if (c.dtype == DType::bf16)
    g.run_bf16(c, static_cast<__nv_bfloat16*>(y), static_cast<const __nv_bfloat16*>(x),
               static_cast<const __nv_bfloat16*>(w), m, n, k, accumulate);
  else
    g.run_f16(c, static_cast<__half*>(y), static_cast<const __half*>(x), static_cast<const __half*>(w), m, n, k,
              accumulate);
  check_launch("matmul (gemv)");
}

// y[M, N] = x[M, K] w[N, K]^T (+ y). Read column-major, row-major y is C[N, M] = w x^T:
// gemm(T, N) with A = w stored K x N (ld K) and B = x stored K x M (ld K).
// fp32 accumulation in every dtype (CUBLAS_COMPUTE_32F; pedantic, so no TF32, in f32 mode).
void run_cublas(Context& c, void* y, const void* x, const void* w, int m, int n, int k, bool accumulate) {
  cudaDataType_t dt = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
  if (c.dtype == DType::bf16) {
    dt = CUDA_R_16BF;
    compute = CUBLAS_COMPUTE_32F;
  } else if (c.dtype == DType::f16) {
    dt = CUDA_R_16F;
    compute = CUBLAS_COMPUTE_32F;
  }
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  check_cublas(cublasGemmEx(c.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, dt, k, x, dt, k, &beta, y, dt, n,
                            compute, CUBLAS_GEMM_DEFAULT),
               "matmul");
  check_launch("matmul");
}

// Times every GEMV kernel that fits and cuBLAS on this shape, into scratch (y is left alone),
// and remembers the fastest (kCublas or a kGemvKernels index; see kPdlCreditUs). Each run starts from a cold L2
// (a write over twice its size), as in a decode step whose weights stream from HBM; best of 3
// after a warm-up round. Once per (M, N, K): the first step of a new shape waits here.
int pick_gemv(Context& c, const void* x, const void* w, int m, int n, int k) {
  const auto key = std::make_tuple(m, n, k);
  if (const auto it = c.gemv_choice.find(key); it != c.gemv_choice.end()) return it->second;
  std::vector<int> cands;
  for (int g = 0; g < kNumGemv; ++g)
    if (gemv_fits(c, g)) cands.push_back(g);
  cands.push_back(kCublas);
  int l2 = 0;
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, c.device), "matmul: tuning");
  const size_t flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  void* y = c.scratch(static_cast<size_t>(m) * n * dtype_size(c.dtype), "matmul: tuning");
  void* flush = nullptr;  // from the stream-ordered pool, for the tuning only
  check(cudaMallocAsync(&flush, flush_bytes, c.stream), "matmul: tuning");
  std::vector<cudaEvent_t> ev(2 * cands.size());
  for (auto& e : ev) check(cudaEventCreate(&e), "matmul: tuning");
  std::vector<float> best(cands.size(), 1e30f);
  for (int rep = 0; rep < 4; ++rep) {  // the first round warms everything up and is not counted
    for (size_t i = 0; i < cands.size(); ++i) {
      check(cudaMemsetAsync(flush, rep + static_cast<int>(i), flush_bytes, c.stream), "matmul: tuning");
      check(cudaEventRecord(ev[2 * i], c.stream), "matmul: tuning");
      if (cands[i] == kCublas) run_cublas(c, y, x, w, m, n, k, false);
      else run_gemv(c, cands[i], y, x, w, m, n, k, false);
      check(cudaEventRecord(ev[2 * i + 1], c.stream), "matmul: tuning");
    }
    check(cudaEventSynchronize(ev.back()), "matmul: tuning");
    for (size_t i = 0; i < cands.size() && rep > 0; ++i) {
      float ms = 0;
      check(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "matmul: tuning");
      best[i] = std::min(best[i], ms);
    }
  }
  for (auto& e : ev) cudaEventDestroy(e);
  check(cudaFreeAsync(flush, c.stream), "matmul: tuning");
  // The timings are of isolated launches; in a step a PDL kernel also hides its launch and first
  // reads behind the previous kernel, so it is credited kPdlCreditUs (a conservative guess of that
  // overlap) before the comparison.
  constexpr float kPdlCreditUs = 0.5f;
  std::vector<float> score = best;
  for (size_t i = 0; i < cands.size(); ++i)
    if (cands[i] != kCublas && kGemvKernels[cands[i]].pdl && pdl_enabled(c)) score[i] -= kPdlCreditUs * 1e-3f;
  const size_t pick = static_cast<size_t>(std::min_element(score.begin(), score.end()) - score.begin());
  c.gemv_choice[key] = cands[pick];
  std::string line;
  for (size_t i = 0; i < cands.size(); ++i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s%s %.1f", i ? ", " : "", cands[i] == kCublas ? "cuBLAS" : kGemvKernels[cands[i]].name,
                  best[i] * 1e3f);
    line += buf;
  }
  log::info("matmul: M=", m, " N=", n, " K=", k, " from a cold L2 (us): ", line, " -> ",
            cands[pick] == kCublas ? "cuBLAS" : kGemvKernels[cands[pick]].name);
  return cands[pick];
}

}  // namespace

// y[M, N] = x[M, K] w[N, K]^T (+ y), through cuBLAS, or for bf16/f16 with M <= c.gemv_max_rows
// (decode) and 16-byte aligned x and w with K % 8 == 0, through a GEMV kernel: c.gemv_kernel
// when set (>= 0), else the fastest of the GEMVs and cuBLAS on this shape (gemv_autotune, timed
// once), else the default GEMV.
void matmul(Context& c, Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  QUILT_ASSERT(x.rank() == 2 && w.rank() == 2 && w.dim(1) == K && y.dim(0) == M && y.dim(1) == N,
               "matmul ", y.describe(), " = ", x.describe(), " x ", w.describe(), "^T");
  QUILT_ASSERT(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX);
  expect(y, c.dtype, "matmul", "y");
  expect(x, c.dtype, "matmul", "x");
  expect(w, c.dtype, "matmul", "w");
  if (M == 0 || N == 0) return;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const bool gemv_ok = c.dtype != DType::f32 && M <= c.gemv_max_rows && M <= 8 && K % 8 == 0 &&
                       aligned16(x.data()) && aligned16(w.data());
  int kernel = kCublas;
  if (gemv_ok) {
    if (c.gemv_kernel >= 0) {
      QUILT_REQUIRE(c.gemv_kernel < kNumGemv, "matmul: gemv_kernel ", c.gemv_kernel, " out of range (", kNumGemv,
                    " GEMV kernels)");
      QUILT_REQUIRE(gemv_fits(c, c.gemv_kernel), "matmul: GEMV kernel '", kGemvKernels[c.gemv_kernel].name,
                    "' does not fit on this device");
      kernel = c.gemv_kernel;
    } else if (c.gemv_autotune) {
      kernel = pick_gemv(c, x.data(), w.data(), m, n, k);
    } else {
      kernel = kDefaultGemv;
    }
  }
  if (kernel == kCublas) run_cublas(c, y.data(), x.data(), w.data(), m, n, k, accumulate);
  else run_gemv(c, kernel, y.data(), x.data(), w.data(), m, n, k, accumulate);
}

}  // namespace quilt::cuda

namespace quilt {

int cuda_gemv_kernel_count() { return cuda::kNumGemv; }

std::string cuda_gemv_kernel_name(int kernel) {
  QUILT_REQUIRE(kernel >= 0 && kernel < cuda::kNumGemv, "cuda_gemv_kernel_name: no GEMV kernel ", kernel);
  return cuda::kGemvKernels[kernel].name;
}

}  // namespace quilt
