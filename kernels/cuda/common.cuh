#pragma once
// Shared by the CUDA ops: the backend context, error checks, dtype dispatch, 16-byte vector
// loads and block reductions. Only .cu files include this header.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

namespace quilt::cuda {

// One per backend; tensors keep it alive through their deleters (they free on its stream).
struct Context {
  int device = 0;
  int num_sms = 132;
  DType dtype = DType::bf16;  // storage dtype of activations, weights and the KV cache
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  void* workspace = nullptr;  // cuBLAS workspace, set once
  size_t workspace_bytes = 0;
  // Ops' scratch (attention's split-K partials): one stream-ordered buffer, grown rarely and
  // never shrunk, so that steady-state steps allocate nothing.
  void* scratch_ptr = nullptr;
  size_t scratch_bytes = 0;
  uint64_t scratch_epoch = 0;  // bumped when scratch_ptr moves (recorded graphs point into it)
  // Zeroed counters for kernels whose last block finishes the work (split-K attention); each
  // such kernel leaves them zero again.
  int* counters = nullptr;
  int64_t counter_count = 0;
  // Pinned host staging for uploads (from_host_i32) and the logits download. Uploads take the
  // next bytes of `up_host` and copy asynchronously; the bytes are reused only after the stream
  // has been synchronised (up_used then goes back to 0), so no copy reads overwritten data.
  void* up_host = nullptr;
  size_t up_bytes = 0, up_used = 0, up_bytes_initial = 0;
  void* down_host = nullptr;
  size_t down_bytes = 0;
  // Kernels whose shared-memory opt-in (above 48 KB) is done, one bit each.
  unsigned smem_opt_in = 0;
  // Kernel choices (benchmark switches): the grouped split-K attention kernel; the GEMVs for x with
  // at most gemv_max_rows (<= 8) rows (matmul.cu): gemv_kernel when >= 0, else the fastest of them
  // and cuBLAS, timed once per (M, N, K) (gemv_autotune, kept in gemv_choice), else the default GEMV.
  bool grouped_attention = true;
  int gemv_max_rows = 8;
  bool gemv_autotune = true;
  int gemv_kernel = -1;
  // paged_attention with host copies of the sequence offsets: sequences with at least this many
  // query rows take the tensor-core prefill kernel (prefill_attention.cu); <= 0: none do.
  int prefill_min_rows = 16;
  // Multi-LoRA (lora_shrink.cu, lora_expand.cu): with lora_overlap, a shrink runs on lora_stream
  // beside the ops that follow it on `stream` (the base matmul), forked there at lora_fork; its
  // expand joins it back at lora_join (lora_forked until then).
  cudaStream_t lora_stream = nullptr;
  cudaEvent_t lora_fork = nullptr, lora_join = nullptr;
  bool lora_overlap = true;
  bool lora_forked = false;
  std::map<std::tuple<int, int, int>, int> gemv_choice;  // (M, N, K) -> GEMV kernel index, -1: cuBLAS
  ~Context();

  // At least `bytes` of device scratch, ordered on the stream (valid until the next call).
  void* scratch(size_t bytes, const char* op);
  // The next `bytes` of the pinned upload ring, to fill on the host and then hand to
  // upload_staged (waits for the stream only when the ring is full; grows it for a larger upload).
  char* staging(size_t bytes, const char* op);
  // Enqueues the copy of `bytes` staged at `staged` (from staging()) to `device_dst` and moves
  // the ring on; no synchronisation.
  void upload_staged(void* device_dst, const char* staged, size_t bytes, const char* op);
  // staging + memcpy + upload_staged.
  void stage_upload(void* device_dst, const void* src, size_t bytes, const char* op);
};

// A failed CUDA call becomes quilt::Error naming the op: the caller can report it (a sticky
// device error still leaves the context unusable, which the message then says on every op).
inline void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess)
    QUILT_FAIL("cuda backend: ", op, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}
inline void check_launch(const char* op) { check(cudaGetLastError(), op); }
inline void check_cublas(cublasStatus_t s, const char* op) {
  if (s != CUBLAS_STATUS_SUCCESS)
    QUILT_FAIL("cuda backend: ", op, ": cuBLAS ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")");
}

// Every tensor an op touches lives on the GPU and has the dtype the op expects.
inline void expect(const Tensor& t, DType dt, const char* op, const char* what) {
  QUILT_ASSERT(t.device() == Device::cuda && t.dtype() == dt, op, ": ", what, " is ", t.describe(),
               " on ", t.device() == Device::cuda ? "cuda" : "cpu", ", expected ", dtype_name(dt));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Calls f(T{}) with the storage type of dt.
template <typename F>
void dispatch(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    case DType::f16: f(__half{}); return;
    case DType::i32:
    case DType::fp8_e4m3: break;
  }
  QUILT_FAIL("cuda backend: ", op, ": no kernel for dtype ", dtype_name(dt));
}

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kVec<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) f[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[kVec<T>]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) e[i] = from_f<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max, returned to every thread; blockDim.x is a multiple of 32. `red` is
// 32 floats of shared memory, reusable right after the call returns.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `red` may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < warps; ++w) r += red[w];  // same order in every thread
  return r;
}
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < warps; ++w) r = fmaxf(r, red[w]);
  return r;
}

inline int threads_for(int64_t work, int max_threads) {
  int64_t t = (work + 31) / 32 * 32;
  if (t < 32) t = 32;
  return static_cast<int>(t < max_threads ? t : max_threads);
}

}  // namespace quilt::cuda
