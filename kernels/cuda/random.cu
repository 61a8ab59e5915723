#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Box-Muller on two 24-bit uniforms drawn from a hash of (seed, index): reproducible and
// independent of the launch shape.
template <typename T>
__global__ void fill_normal_kernel(T* __restrict__ out, int64_t n, uint64_t seed, float stddev) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed * 0x632be59bd9b4e019ull + static_cast<uint64_t>(i));
    const float u1 = (static_cast<float>(r >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    const float u2 = static_cast<float>((r >> 8) & 0xffffffu) * (1.0f / 16777216.0f);
    out[i] = from_f<T>(stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

}  // namespace

void fill_normal(Context& c, Tensor& t, uint64_t seed, float stddev) {
  expect(t, t.dtype() == DType::i32 ? DType::f32 : t.dtype(), "fill_normal", "t");
  const int64_t n = t.numel();
  if (n == 0) return;
  dispatch(t.dtype(), "fill_normal", [&](auto tag) {
    using T_ = decltype(tag);
    const int64_t blocks = std::min<int64_t>((n + 255) / 256, 132 * 32);
    fill_normal_kernel<T_><<<blocks, 256, 0, c.stream>>>(t.as<T_>(), n, seed, stddev);
  });
  check_launch("fill_normal");
}

}  // namespace quilt::cuda
