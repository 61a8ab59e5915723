#pragma once
// Programmatic dependent launch (PDL, sm_90+) for the decode step's chain of small kernels and
// GEMVs. A kernel launched with launch_pdl may be scheduled while the kernel before it on the
// stream is still running, as soon as every block of that one has called pdl_launch_dependents
// (or exited); inside a CUDA graph the same launch records a programmatic edge. So the launch
// latency and, for the GEMV, the first weight reads (an L2 prefetch) overlap the previous kernel.
//
// The contract, for every kernel launched through launch_pdl:
//  - every thread calls pdl_wait() before it reads or writes any global memory that another
//    kernel writes or reads (activations, outputs, scratch, counters), and before it exits;
//    pdl_wait returns once the previous grid has completed and its writes are visible;
//  - before pdl_wait it may only issue L2 prefetches (prefetch.global.L2): L2 is the point of
//    coherence, so a prefetch never returns stale data, while a load into registers or shared
//    memory could (weights written by the kernel just before, as in the tests).
// Since each such kernel waits for its predecessor to complete before it completes itself, the
// chain stays ordered transitively: when pdl_wait returns, every earlier op on the stream is done.
// Kernels launched the usual way (<<<>>>, cuBLAS, NCCL, copies) keep full stream order, both for
// themselves and for a PDL kernel that follows them (which then just starts a little earlier).
//
// pdl_launch_dependents() is a hint that may be called anywhere (also by kernels launched the
// usual way): the next kernel, if launched with launch_pdl, can start its prologue now.
//
// QUILT_CUDA_PDL=0 in the environment launches everything the usual way (a switch for A/B runs
// and a way out should a driver reject programmatic edges in graphs).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "kernels/cuda/common.cuh"
#include "runtime/core/log.h"

namespace quilt::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Set when a launch with the attribute failed and the same launch without it worked: PDL is off
// for the rest of the process (with a warning).
inline std::atomic<bool>& pdl_refused() {
  static std::atomic<bool> refused{false};
  return refused;
}

// Whether launch_pdl sets the programmatic attribute on this context's device: compute
// capability 9.0 or newer, QUILT_CUDA_PDL is not "0", and no launch refused it. Cached per device.
inline bool pdl_enabled(const Context& c) {
  static const bool env_on = [] {
    const char* e = std::getenv("QUILT_CUDA_PDL");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  if (!env_on || pdl_refused().load(std::memory_order_relaxed)) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> major[kMaxDevices] = {};  // 0: not asked yet
  if (c.device < 0 || c.device >= kMaxDevices) return false;
  int m = major[c.device].load(std::memory_order_relaxed);
  if (m == 0) {
    check(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, c.device), "pdl: compute capability");
    major[c.device].store(m, std::memory_order_relaxed);
  }
  return m >= 9;
}

// kernel<<<grid, block, smem, c.stream>>>(args...), with the programmatic-serialization
// attribute when pdl_enabled(c). The kernel must follow the contract above.
template <typename... KernelArgs, typename... Args>
void launch_pdl(const Context& c, const char* op, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                size_t smem, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled(c) ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess && cfg.numAttrs == 1) {
    const cudaError_t with_pdl = err;
    cudaGetLastError();  // clear it, then try the usual launch
    cfg.numAttrs = 0;
    err = cudaLaunchKernelEx(&cfg, kernel, args...);
    if (err == cudaSuccess && !pdl_refused().exchange(true))
      log::warn("cuda backend: ", op, ": a launch with programmatic dependent launch failed (",
                cudaGetErrorName(with_pdl), "); PDL is off from now on");
  }
  check(err, op);
}

}  // namespace quilt::cuda
