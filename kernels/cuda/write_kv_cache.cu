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
  expect(k_cache, c.dtype, "write_kv_cache", "k_cache");
  expect(v_cache, c.dtype, "write_kv_cache", "v_cache");
  expect(qkv, c.dtype, "write_kv_cache", "qkv");
  expect(slots, DType::i32, "write_kv_cache", "slots");
  if (T == 0) return;
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
