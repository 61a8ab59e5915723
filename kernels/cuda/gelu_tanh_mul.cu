#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace quilt::cuda {
namespace {

// gelu_tanh(g) * u in fp32 with one rounding: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
__device__ __forceinline__ float gelu_mul(float g, float u) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * u;
}

// Grid-stride over the T * I outputs; VEC: I is a multiple of kVec<T> and rows are aligned,
// so a vector never straddles the gate/up halves. Launched with PDL (pdl.cuh).
template <typename T, bool VEC>
__global__ void gelu_tanh_mul_kernel(T* __restrict__ out,            // [T, I]
                                     const T* __restrict__ gate_up,  // [T, 2 I]
                                     int64_t T_, int64_t I) {
  pdl_launch_dependents();
  pdl_wait();
  constexpr int N = VEC ? kVec<T> : 1;
  const int64_t total = T_ * I / N;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * N, t = e / I, i = e - t * I;
    const T* g = gate_up + t * 2 * I + i;
    if constexpr (VEC) {
      float gf[N], uf[N];
      load_vec(g, gf);
      load_vec(g + I, uf);
#pragma unroll
      for (int k = 0; k < N; ++k) gf[k] = gelu_mul(gf[k], uf[k]);
      store_vec(out + e, gf);
    } else {
      out[e] = from_f<T>(gelu_mul(to_f(g[0]), to_f(g[I])));
    }
  }
}

}  // namespace

void gelu_tanh_mul(Context& c, Tensor& out, const Tensor& gate_up) {
  const int64_t T = gate_up.dim(0), I = out.dim(1);
  QUILT_ASSERT(gate_up.dim(1) == 2 * I && out.dim(0) == T, "gelu_tanh_mul ", out.describe(), " of ",
               gate_up.describe());
  expect(out, c.dtype, "gelu_tanh_mul", "out");
  expect(gate_up, c.dtype, "gelu_tanh_mul", "gate_up");
  if (T == 0 || I == 0) return;
  dispatch(c.dtype, "gelu_tanh_mul", [&](auto tag) {
    using T_ = decltype(tag);
    const bool vec = I % kVec<T_> == 0 && aligned16(out.data()) && aligned16(gate_up.data());
    const int64_t work = T * I / (vec ? kVec<T_> : 1);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((work + threads - 1) / threads, 132 * 16);
    const dim3 grid(static_cast<unsigned>(blocks));
    if (vec)
      launch_pdl(c, "gelu_tanh_mul", gelu_tanh_mul_kernel<T_, true>, grid, dim3(threads), 0, out.as<T_>(),
                 gate_up.as<T_>(), T, I);
    else
      launch_pdl(c, "gelu_tanh_mul", gelu_tanh_mul_kernel<T_, false>, grid, dim3(threads), 0, out.as<T_>(),
                 gate_up.as<T_>(), T, I);
  });
  check_launch("gelu_tanh_mul");
}

}  // namespace quilt::cuda
