#include <algorithm>
#include <climits>

#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvUnroll = 8;  // 16-byte weight loads in flight per lane

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

// y[M, N] = x[M, K] w[N, K]^T (+ y) for small M (decode): memory-bound on w. A block of 8 warps
// takes 8 / wpr rows; the wpr warps of a row split K (wpr > 1 for long rows such as down's, so
// that each warp has one batch of loads to wait for), each streaming its slice with 16-byte loads,
// kGemvUnroll in flight per lane, into M fp32 accumulators; x (M x K, a few KB) is read through L1.
// The warps' sums meet in shared memory. One rounding per output, of acc + y when accumulating,
// as cuBLAS's beta = 1. One row group per block, no grid-stride: the block scheduler balances.
template <typename T, int M>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(T* __restrict__ y,        // [M, N]
                const T* __restrict__ x,  // [M, K]
                const T* __restrict__ w,  // [N, K]
                int N, int K, int wpr, int k_slice, bool accumulate) {
  __shared__ float red[kGemvThreads / 32][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rows_per_block = (kGemvThreads / 32) / wpr;
  const int n = blockIdx.x * rows_per_block + warp / wpr;
  const int part = warp % wpr;
  constexpr int kStep = 32 * 8;  // elements of a row per warp-wide 16-byte load
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  if (n < N) {
    const T* wr = w + static_cast<int64_t>(n) * K;
    const int k_end = min(K, (part + 1) * k_slice);
    for (int k0 = part * k_slice + lane * 8; k0 < k_end; k0 += kStep * kGemvUnroll) {
      uint4 wv[kGemvUnroll];
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
        const int k = k0 + u * kStep;
        wv[u] = k < k_end ? load_stream(wr + k) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kGemvUnroll; ++u) {
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
void launch_gemv(Context& c, T* y, const T* x, const T* w, int N, int K, bool accumulate) {
  // Warps per row: one per 2048 elements (one batch of loads per lane), at most the block's 8.
  int wpr = 1;
  while (wpr < kGemvThreads / 32 && K > wpr * 2048) wpr *= 2;
  constexpr int kStep = 32 * 8;  // a warp-wide 16-byte load
  const int k_slice = ((K + wpr - 1) / wpr + kStep - 1) / kStep * kStep;
  const int rows_per_block = (kGemvThreads / 32) / wpr;
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  gemv_kernel<T, M><<<static_cast<unsigned>(blocks), kGemvThreads, 0, c.stream>>>(y, x, w, N, K, wpr, k_slice,
                                                                                  accumulate);
}

template <typename T>
void gemv(Context& c, T* y, const T* x, const T* w, int M, int N, int K, bool accumulate) {
  switch (M) {
    case 1: return launch_gemv<T, 1>(c, y, x, w, N, K, accumulate);
    case 2: return launch_gemv<T, 2>(c, y, x, w, N, K, accumulate);
    case 3: return launch_gemv<T, 3>(c, y, x, w, N, K, accumulate);
    case 4: return launch_gemv<T, 4>(c, y, x, w, N, K, accumulate);
    case 5: return launch_gemv<T, 5>(c, y, x, w, N, K, accumulate);
    case 6: return launch_gemv<T, 6>(c, y, x, w, N, K, accumulate);
    case 7: return launch_gemv<T, 7>(c, y, x, w, N, K, accumulate);
    case 8: return launch_gemv<T, 8>(c, y, x, w, N, K, accumulate);
  }
  QUILT_ASSERT(false, "gemv: M = ", M);
}

void run_gemv(Context& c, void* y, const void* x, const void* w, int m, int n, int k, bool accumulate) {
  if (c.dtype == DType::bf16)
    gemv(c, static_cast<__nv_bfloat16*>(y), static_cast<const __nv_bfloat16*>(x),
         static_cast<const __nv_bfloat16*>(w), m, n, k, accumulate);
  else
    gemv(c, static_cast<__half*>(y), static_cast<const __half*>(x), static_cast<const __half*>(w), m, n, k,
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

// Times the GEMV against cuBLAS for this shape, into scratch (y is left alone), and remembers the
// faster. Each run starts from a cold L2 (a write over twice its size), as in a decode step whose
// weights stream from HBM. Once per (M, N, K): the first step of a new shape waits here.
bool gemv_is_faster(Context& c, const void* x, const void* w, int m, int n, int k) {
  const auto key = std::make_tuple(m, n, k);
  if (const auto it = c.gemv_faster.find(key); it != c.gemv_faster.end()) return it->second;
  int l2 = 0;
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, c.device), "matmul: tuning");
  const size_t flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  void* y = c.scratch(static_cast<size_t>(m) * n * dtype_size(c.dtype), "matmul: tuning");
  void* flush = nullptr;  // from the stream-ordered pool, for the tuning only
  check(cudaMallocAsync(&flush, flush_bytes, c.stream), "matmul: tuning");
  cudaEvent_t ev[4];
  for (auto& e : ev) check(cudaEventCreate(&e), "matmul: tuning");
  float best_gemv = 1e30f, best_cublas = 1e30f;
  for (int rep = 0; rep < 4; ++rep) {  // the first round warms both up and is not counted
    check(cudaMemsetAsync(flush, rep, flush_bytes, c.stream), "matmul: tuning");
    check(cudaEventRecord(ev[0], c.stream), "matmul: tuning");
    run_gemv(c, y, x, w, m, n, k, false);
    check(cudaEventRecord(ev[1], c.stream), "matmul: tuning");
    check(cudaMemsetAsync(flush, rep + 1, flush_bytes, c.stream), "matmul: tuning");
    check(cudaEventRecord(ev[2], c.stream), "matmul: tuning");
    run_cublas(c, y, x, w, m, n, k, false);
    check(cudaEventRecord(ev[3], c.stream), "matmul: tuning");
    check(cudaEventSynchronize(ev[3]), "matmul: tuning");
    float a = 0, b = 0;
    check(cudaEventElapsedTime(&a, ev[0], ev[1]), "matmul: tuning");
    check(cudaEventElapsedTime(&b, ev[2], ev[3]), "matmul: tuning");
    if (rep > 0) {
      best_gemv = std::min(best_gemv, a);
      best_cublas = std::min(best_cublas, b);
    }
  }
  for (auto& e : ev) cudaEventDestroy(e);
  check(cudaFreeAsync(flush, c.stream), "matmul: tuning");
  const bool faster = best_gemv < best_cublas;
  c.gemv_faster[key] = faster;
  return faster;
}

}  // namespace

// y[M, N] = x[M, K] w[N, K]^T (+ y), through cuBLAS, or for bf16/f16 with M <= c.gemv_max_rows
// (decode) and 16-byte aligned x and w with K % 8 == 0, through the GEMV above when it is the
// faster of the two on this shape (timed once, gemv_is_faster).
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
  if (gemv_ok && (!c.gemv_autotune || gemv_is_faster(c, x.data(), w.data(), m, n, k)))
    run_gemv(c, y.data(), x.data(), w.data(), m, n, k, accumulate);
  else
    run_cublas(c, y.data(), x.data(), w.data(), m, n, k, accumulate);
}

}  // namespace quilt::cuda
