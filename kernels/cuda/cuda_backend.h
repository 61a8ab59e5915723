#pragma once
// The CUDA backend (plain C++ header: backend_factory.cpp and the tests include it).
#include <cstdint>
#include <memory>
#include <string>

#include "quilt/kernels/backend.h"

namespace quilt {
// Number of CUDA devices visible to this process (0 when the driver or a GPU is missing).
int cuda_device_count();
// compute_dtype: bf16 (default), f32 (exactness checks against the CPU) or f16.
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& options = {});

// Test and benchmark helpers for a backend made by make_cuda_backend (they throw otherwise).
// Waits until every op enqueued so far has finished.
void cuda_synchronize(Backend& backend);
// Fills t with N(0, stddev^2) values generated on the GPU from (seed, element index).
void cuda_fill_normal(Backend& backend, Tensor& t, uint64_t seed, float stddev);

// The backend's compute stream (a cudaStream_t) and device ordinal, for collectives that must run
// in its stream order (runtime/comm's NCCL communicator); CUDA types stay out of this header.
void* cuda_native_stream(Backend& backend);
int cuda_device_ordinal(Backend& backend);
std::string cuda_device_name(Backend& backend);

// The fp32 scales of an fp8_e4m3 KV cache tensor of this backend, [num_kv_heads, slots] (kv_fp8.cuh):
// a view that does not own memory, valid while the cache lives (tests read it with to_host_f32).
Tensor cuda_kv_cache_scales(const Tensor& kv_cache);

// Kernel choices, for benchmarks that compare them (the defaults are the fast ones).
struct CudaKernelOptions {
  bool grouped_attention = true;  // false: the stage-1 attention kernel (one block per q head)
  int gemv_max_rows = 8;          // matmuls with at most this many rows (<= 8) may use the GEMV (0: cuBLAS)
  bool gemv_autotune = true;      // time the GEMVs and cuBLAS once per shape, keep the fastest; false: a GEMV
  int prefill_min_rows = 16;      // q_len from which paged_attention uses the prefill kernel (<= 0: never)
  bool lora_overlap = true;       // lora_shrink on a second stream beside the base matmul (false: in line)
  int gemv_kernel = -1;           // >= 0: always this GEMV kernel where a GEMV may run (cuda_gemv_kernel_name)
};
void cuda_set_kernel_options(Backend& backend, const CudaKernelOptions& options);
// The GEMV kernels of matmul (M <= 8), by index, for CudaKernelOptions::gemv_kernel.
int cuda_gemv_kernel_count();
std::string cuda_gemv_kernel_name(int kernel);
}  // namespace quilt
