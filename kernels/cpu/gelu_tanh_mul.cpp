#include <cmath>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), Gemma's "gelu".
void gelu_tanh_mul(Tensor& out, const Tensor& gate_up) {
  const int64_t T = gate_up.dim(0), I = out.dim(1);
  QUILT_ASSERT(gate_up.dim(1) == 2 * I && out.dim(0) == T);
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gate_up.as<float>() + t * 2 * I;
    const float* u = g + I;
    float* o = out.as<float>() + t * I;
    for (int64_t i = 0; i < I; ++i) {
      const float x = g[i];
      const float gelu = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
      o[i] = gelu * u[i];
    }
  }
}

}  // namespace quilt::cpu
