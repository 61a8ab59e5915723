#include <algorithm>

#include "kernels/cuda/kv_fp8.cuh"
#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

// One block per token: copies the k and v parts of its fused row to its slot. Slots < 0 are
// padding; slots past the cache are skipped too (the model rejects them before any op runs).
template <typename T, bool VEC>
__global__ void write_kv_kernel(T* __restrict__ k_cache,        // [slots, Hkv, D]
                                T* __restrict__ v_cache,        // [slots, Hkv, D]
                                const T* __restrict__ qkv,      // [T, row]
                                const int32_t* __restrict__ slots,  // [T]
                                int64_t row, int64_t q_width, int64_t kv, int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  const T* k = qkv + t * row + q_width;
  const T* v = k + kv;
  T* kd = k_cache + slot * kv;
  T* vd = v_cache + slot * kv;
  if constexpr (VEC) {
    constexpr int N = kVec<T>;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < kv; i += static_cast<int64_t>(blockDim.x) * N) {
      *reinterpret_cast<uint4*>(kd + i) = *reinterpret_cast<const uint4*>(k + i);
      *reinterpret_cast<uint4*>(vd + i) = *reinterpret_cast<const uint4*>(v + i);
    }
  } else {
    for (int64_t i = threadIdx.x; i < kv; i += blockDim.x) {
      kd[i] = k[i];
      vd[i] = v[i];
    }
  }
}

// The fp8 cache (kv_fp8.cuh): one block per token, one warp per (k or v, KV head) row of D values
// at a time: the row's amax (a warp max), then each value times 448 / amax rounded to e4m3, and
// the scale amax / 448 beside the cache. VEC: kVec<T> values per lane per step (16-byte loads,
// kVec<T>-byte stores).
template <typename T, bool VEC>
__global__ void write_kv_fp8_kernel(uint8_t* __restrict__ k_cache,      // [slots, Hkv, D] e4m3
                                    uint8_t* __restrict__ v_cache,      // [slots, Hkv, D] e4m3
                                    float* __restrict__ k_scales,       // [Hkv, slots]
                                    float* __restrict__ v_scales,       // [Hkv, slots]
                                    const T* __restrict__ qkv,          // [T, row]
                                    const int32_t* __restrict__ slots,  // [T]
                                    int64_t row, int64_t q_width, int Hkv, int D, int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int r = warp; r < 2 * Hkv; r += warps) {  // warp-uniform: every lane joins the shuffles
    const bool is_v = r >= Hkv;
    const int h = is_v ? r - Hkv : r;
    const T* src = qkv + t * row + q_width + (is_v ? static_cast<int64_t>(Hkv) * D : 0) + static_cast<int64_t>(h) * D;
    uint8_t* dst = (is_v ? v_cache : k_cache) + (slot * Hkv + h) * D;
    float amax = 0.f;
    if constexpr (VEC) {
      constexpr int N = kVec<T>;
      for (int i = lane * N; i < D; i += 32 * N) {
        float f[N];
        load_vec(src + i, f);
#pragma unroll
        for (int e = 0; e < N; ++e) amax = fmaxf(amax, fabsf(f[e]));
      }
    } else {
      for (int i = lane; i < D; i += 32) amax = fmaxf(amax, fabsf(to_f(src[i])));
    }
    amax = warp_max(amax);
    // IEEE divisions (the host's test model computes the same bits); an all-zero row stores 0, 0.
    const float inv = amax > 0.f ? __fdiv_rn(kFp8Max, amax) : 0.f;
    if constexpr (VEC) {
      constexpr int N = kVec<T>;  // 8 (bf16, f16) or 4 (f32): 8 or 4 bytes out
      for (int i = lane * N; i < D; i += 32 * N) {
        float f[N];
        load_vec(src + i, f);
        uint16_t q[N / 2];
#pragma unroll
        for (int e = 0; e < N / 2; ++e) q[e] = fp8x2_from_floats(f[2 * e] * inv, f[2 * e + 1] * inv);
        if constexpr (N == 8) {
          *reinterpret_cast<uint2*>(dst + i) = make_uint2(q[0] | (static_cast<uint32_t>(q[1]) << 16),
                                                          q[2] | (static_cast<uint32_t>(q[3]) << 16));
        } else {
          *reinterpret_cast<uint32_t*>(dst + i) = q[0] | (static_cast<uint32_t>(q[1]) << 16);
        }
      }
    } else {
      for (int i = lane; i < D; i += 32)
        dst[i] = static_cast<uint8_t>(fp8x2_from_floats(to_f(src[i]) * inv, 0.f) & 0xffu);
    }
    if (lane == 0) (is_v ? v_scales : k_scales)[static_cast<int64_t>(h) * num_slots + slot] = __fdiv_rn(amax, kFp8Max);
  }
}

}  // namespace

void write_kv_cache(Context& c, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv,
                    const Tensor& slots, const KvWriteParams& p) {
  const int64_t T = qkv.dim(0), D = p.head_dim;
  const int64_t kv = static_cast<int64_t>(p.num_kv_heads) * D;
  const int64_t q_width = static_cast<int64_t>(p.num_q_heads) * D;
  const int64_t row = q_width + 2 * kv;
  const int64_t num_slots = k_cache.dim(0);
  QUILT_ASSERT(qkv.dim(1) == row && slots.numel() == T && k_cache.numel() == num_slots * kv &&
                   v_cache.numel() == k_cache.numel(),
               "write_kv_cache ", qkv.describe(), " into ", k_cache.describe());
  const bool fp8 = k_cache.dtype() == DType::fp8_e4m3;
  expect(k_cache, fp8 ? DType::fp8_e4m3 : c.dtype, "write_kv_cache", "k_cache");
  expect(v_cache, k_cache.dtype(), "write_kv_cache", "v_cache");
  expect(qkv, c.dtype, "write_kv_cache", "qkv");
  expect(slots, DType::i32, "write_kv_cache", "slots");
  if (T == 0) return;
  if (fp8) {
    QUILT_ASSERT(k_cache.rank() == 3 && k_cache.dim(1) == p.num_kv_heads && k_cache.dim(2) == D,
                 "write_kv_cache: fp8 cache ", k_cache.describe(), " for ", p.num_kv_heads, " heads of ", D);
    dispatch(c.dtype, "write_kv_cache", [&](auto tag) {
      using T_ = decltype(tag);
      constexpr int N = kVec<T_>;
      const bool vec = D % N == 0 && row % N == 0 && q_width % N == 0 && aligned16(qkv.data()) &&
                       aligned16(k_cache.data()) && aligned16(v_cache.data());
      const int threads = 32 * static_cast<int>(std::min<int64_t>(8, 2 * p.num_kv_heads));
      auto kernel = vec ? write_kv_fp8_kernel<T_, true> : write_kv_fp8_kernel<T_, false>;
      kernel<<<T, threads, 0, c.stream>>>(k_cache.as<uint8_t>(), v_cache.as<uint8_t>(), kv_fp8_scales(k_cache),
                                          kv_fp8_scales(v_cache), qkv.as<T_>(), slots.as<int32_t>(), row, q_width,
                                          p.num_kv_heads, static_cast<int>(D), num_slots);
    });
    check_launch("write_kv_cache fp8");
    return;
  }
  dispatch(c.dtype, "write_kv_cache", [&](auto tag) {
    using T_ = decltype(tag);
    constexpr int N = kVec<T_>;
    const bool vec = kv % N == 0 && row % N == 0 && q_width % N == 0 && aligned16(qkv.data()) &&
                     aligned16(k_cache.data()) && aligned16(v_cache.data());
    const int threads = threads_for(vec ? kv / N : kv, 256);
    if (vec)
      write_kv_kernel<T_, true><<<T, threads, 0, c.stream>>>(k_cache.as<T_>(), v_cache.as<T_>(), qkv.as<T_>(),
                                                             slots.as<int32_t>(), row, q_width, kv, num_slots);
    else
      write_kv_kernel<T_, false><<<T, threads, 0, c.stream>>>(k_cache.as<T_>(), v_cache.as<T_>(), qkv.as<T_>(),
                                                              slots.as<int32_t>(), row, q_width, kv, num_slots);
  });
  check_launch("write_kv_cache");
}

}  // namespace quilt::cuda
