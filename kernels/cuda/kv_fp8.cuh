#pragma once
// The fp8 (e4m3) KV cache of the CUDA backend: its layout and the conversions shared by
// write_kv_cache.cu (quantises), paged_attention.cu and prefill_attention.cu (dequantise on load).
//
// Scales: one fp32 scale per (token slot, KV head), for k and v separately, set by
// write_kv_cache from the row it writes: scale = amax / 448 over the head's head_dim values, and
// each value is stored as e4m3(x * 448 / amax), rounded to nearest even (saturating). So every
// head row uses e4m3's whole range, nothing clips, and a value is off by at most 2^-4 of itself
// (3 mantissa bits: unit roundoff 2^-4), or 2^-10 * scale in the subnormal range (|x| < 2^-6 *
// scale, i.e. values 2^-6 below the row's largest). The scale is 4 bytes per head_dim bytes (1.6%
// at head_dim 256). Why per token and not static per (layer, head) scales: no calibration pass,
// no clipping of outlier tokens, and the result of a token depends only on its own values (the
// same in every batch, deterministic), computed on the GPU as part of the write (graph-capturable,
// no host synchronisation). A (layer, KV head)'s scales are contiguous over slots, so a tile of
// keys reads its scales in one or two sectors.
//
// Layout of one layer's k (or v) cache: one allocation holding
//   values [slots, Hkv, D] e4m3 (the Tensor: shape, dtype fp8_e4m3, data pointer at the start),
//   scales [Hkv, slots] fp32 at byte offset kv_fp8_scale_offset(slots * Hkv * D);
// the value of (slot, h, d) is e4m3 * scale[h, slot]; a slot never written holds 0 (scale 0).
#include <cuda_fp8.h>

#include "kernels/cuda/common.cuh"

namespace quilt::cuda {

constexpr float kFp8Max = 448.f;  // e4m3's largest finite value

inline size_t kv_fp8_scale_offset(int64_t values) { return static_cast<size_t>((values + 255) / 256 * 256); }
inline size_t kv_fp8_bytes(int64_t slots, int64_t num_kv_heads, int64_t head_dim) {
  return kv_fp8_scale_offset(slots * num_kv_heads * head_dim) + static_cast<size_t>(slots * num_kv_heads) * 4;
}
// The scales of an fp8 cache tensor ([slots, Hkv, D]): [Hkv, slots] fp32.
inline float* kv_fp8_scales(const Tensor& cache) {
  QUILT_ASSERT(cache.dtype() == DType::fp8_e4m3 && cache.rank() == 3, "fp8 KV scales of ", cache.describe());
  return reinterpret_cast<float*>(static_cast<char*>(cache.data()) + kv_fp8_scale_offset(cache.numel()));
}

// Two floats to two e4m3 (a in the low byte), round to nearest even, saturating.
__device__ __forceinline__ uint16_t fp8x2_from_floats(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}
// Two e4m3 (low byte first) to floats, exactly (through f16, which holds every e4m3 value).
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t v) {
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3)));
}
__device__ __forceinline__ float fp8_to_float(uint8_t v) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
}
// Eight e4m3 held in a uint2 (bytes in memory order) to floats.
__device__ __forceinline__ void fp8x8_to_floats(uint2 raw, float (&f)[8]) {
  const float2 a = fp8x2_to_float2(static_cast<uint16_t>(raw.x & 0xffffu));
  const float2 b = fp8x2_to_float2(static_cast<uint16_t>(raw.x >> 16));
  const float2 c = fp8x2_to_float2(static_cast<uint16_t>(raw.y & 0xffffu));
  const float2 d = fp8x2_to_float2(static_cast<uint16_t>(raw.y >> 16));
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y, f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;  // 0: fill with zeros, read nothing
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

}  // namespace quilt::cuda
