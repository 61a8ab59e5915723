#pragma once
// Device helpers shared by the multi-LoRA kernels (lora_sgmv.cu, lora_shrink.cu, lora_expand.cu).
#include "kernels/cuda/common.cuh"

namespace quilt::cuda::lora {

// Reduce-scatter across a warp: on return, lane l holds in v[0] the sum over the 32 lanes of
// v[l]. Each step keeps half of the values (those of the lane's bit `Off`) and adds the
// partner's half: 31 shuffles for 32 sums.
template <int Off>
struct ReduceScatter {
  static __device__ __forceinline__ void step(float (&v)[32], int lane) {
    const bool upper = (lane & Off) != 0;
#pragma unroll
    for (int j = 0; j < Off; ++j) {
      const float send = upper ? v[j] : v[j + Off];
      const float keep = upper ? v[j + Off] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, Off);
    }
    ReduceScatter<Off / 2>::step(v, lane);
  }
};
template <>
struct ReduceScatter<0> {
  static __device__ __forceinline__ void step(float (&)[32], int) {}
};

// kVec<T> consecutive elements at p as raw 16 bytes: one aligned vector load (`Vec`: in bounds and
// aligned), else element by element, zero (all-zero bits: 0.0 in f32, bf16 and f16) from `valid` on.
template <typename T, bool Vec>
__device__ __forceinline__ uint4 load_raw(const T* p, int64_t valid) {
  if (Vec) return *reinterpret_cast<const uint4*>(p);
  uint4 raw = make_uint4(0u, 0u, 0u, 0u);
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i)
    if (i < valid) e[i] = p[i];
  return raw;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[kVec<T>]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) f[i] = to_f(e[i]);
}

__device__ __forceinline__ bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace quilt::cuda::lora
