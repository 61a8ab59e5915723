#include <cmath>

#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kMaxHalf = 128;  // head_dim <= 256

// theta^(-2i/D), computed on the host exactly as the CPU reference does, so that f32 angles
// (position * inv_freq, ~1e3 rad at long positions) agree to the last bit.
struct InvFreq {
  float v[kMaxHalf];
};

// One block per token; a thread per (head, pair) of the q and k heads, which are contiguous
// at the start of the fused row. x' = x cos + rotate_half(x) sin, pairs (i, i + D/2), fp32,
// one rounding per element. __fmul_rn/__fsub_rn keep the CPU's unfused arithmetic.
template <typename T>
__global__ void rope_kernel(T* __restrict__ qkv,                // [T, row]
                            const int32_t* __restrict__ positions,  // [T]
                            int64_t row, int heads, int D, InvFreq f) {
  const int64_t t = blockIdx.x;
  const int half = D / 2;
  const float pos = static_cast<float>(positions[t]);
  T* base = qkv + t * row;
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int h = idx / half, i = idx - h * half;
    float s, c;
    sincosf(pos * f.v[i], &s, &c);
    T* x = base + static_cast<int64_t>(h) * D;
    const float a = to_f(x[i]), b = to_f(x[i + half]);
    x[i] = from_f<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    x[i + half] = from_f<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
  }
}

}  // namespace

void rope(Context& c, Tensor& qkv, const Tensor& positions, const RopeParams& p) {
  const int64_t T = qkv.dim(0), D = p.head_dim, half = D / 2;
  const int64_t row = static_cast<int64_t>(p.num_q_heads + 2 * p.num_kv_heads) * D;
  QUILT_ASSERT(qkv.dim(1) == row && positions.numel() == T && D % 2 == 0 && half <= kMaxHalf,
               "rope ", qkv.describe(), " with head_dim ", D);
  expect(qkv, c.dtype, "rope", "qkv");
  expect(positions, DType::i32, "rope", "positions");
  if (T == 0) return;
  InvFreq f{};
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(D);
    f.v[i] = 1.0f / std::pow(p.theta, expo);
  }
  const int heads = p.num_q_heads + p.num_kv_heads;
  const int threads = threads_for(static_cast<int64_t>(heads) * half, 512);
  dispatch(c.dtype, "rope", [&](auto tag) {
    using T_ = decltype(tag);
    rope_kernel<T_><<<T, threads, 0, c.stream>>>(qkv.as<T_>(), positions.as<int32_t>(), row, heads,
                                                  static_cast<int>(D), f);
  });
  check_launch("rope");
}

}  // namespace quilt::cuda
