#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace quilt::cuda {
namespace {

constexpr int kMaxHalf = 128;  // head_dim <= 256

// theta^(-2i/D), computed on the host exactly as the CPU reference does, so that f32 angles
// (position * inv_freq, ~1e3 rad at long positions) agree to the last bit.
struct InvFreq {
  float v[kMaxHalf];
};

// One block per token, threadIdx.x = pair index i < D/2: a thread takes sin/cos of pos * theta_i
// once and rotates pair i of heads threadIdx.y, + blockDim.y, ... of the q and k heads (contiguous
// at the start of the fused row), up to 4 heads' loads in flight before the stores.
// x' = x cos + rotate_half(x) sin, pairs (i, i + D/2), fp32, one rounding per element;
// __fmul_rn/__fsub_rn keep the CPU's unfused arithmetic. Launched with PDL (pdl.cuh).
template <typename T>
__global__ void __launch_bounds__(1024) rope_kernel(T* __restrict__ qkv,                // [T, row]
                            const int32_t* __restrict__ positions,  // [T]
                            int64_t row, int heads, int D, InvFreq f) {
  pdl_launch_dependents();
  pdl_wait();
  constexpr int kHeads = 4;
  const int64_t t = blockIdx.x;
  const int half = D / 2, i = threadIdx.x;
  const float pos = static_cast<float>(positions[t]);
  float s, c;
  sincosf(pos * f.v[i], &s, &c);
  T* base = qkv + t * row + i;
  const int step = blockDim.y;
  for (int h0 = threadIdx.y; h0 < heads; h0 += kHeads * step) {
    float a[kHeads], b[kHeads];
#pragma unroll
    for (int u = 0; u < kHeads; ++u) {
      const int h = h0 + u * step;
      if (h < heads) {
        a[u] = to_f(base[static_cast<int64_t>(h) * D]);
        b[u] = to_f(base[static_cast<int64_t>(h) * D + half]);
      }
    }
#pragma unroll
    for (int u = 0; u < kHeads; ++u) {
      const int h = h0 + u * step;
      if (h < heads) {
        T* x = base + static_cast<int64_t>(h) * D;
        x[0] = from_f<T>(__fsub_rn(__fmul_rn(a[u], c), __fmul_rn(b[u], s)));
        x[half] = from_f<T>(__fadd_rn(__fmul_rn(b[u], c), __fmul_rn(a[u], s)));
      }
    }
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
  QUILT_ASSERT(T <= INT_MAX && half > 0, "rope: ", T, " tokens, head_dim ", D);
  // blockDim.x = D/2 pairs; blockDim.y head lanes, each taking up to 4 heads at once.
  const int lanes = static_cast<int>(std::clamp<int64_t>((heads + 3) / 4, 1, 1024 / half));
  dispatch(c.dtype, "rope", [&](auto tag) {
    using T_ = decltype(tag);
    launch_pdl(c, "rope", rope_kernel<T_>, dim3(static_cast<unsigned>(T)), dim3(static_cast<unsigned>(half), lanes), 0,
               qkv.as<T_>(), positions.as<int32_t>(), row, heads, static_cast<int>(D), f);
  });
  check_launch("rope");
}

}  // namespace quilt::cuda
