#include <cstring>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

void gather_rows(Tensor& out, const Tensor& x, const Tensor& indices) {
  const int64_t M = indices.numel(), H = x.dim(1), T = x.dim(0);
  QUILT_ASSERT(out.dim(0) == M && out.dim(1) == H);
  const int32_t* idx = indices.as<int32_t>();
  for (int64_t m = 0; m < M; ++m) {
    QUILT_ASSERT(idx[m] >= 0 && idx[m] < T, "row index ", idx[m], " outside [0, ", T, ")");
    std::memcpy(out.as<float>() + m * H, x.as<float>() + idx[m] * H, H * sizeof(float));
  }
}

}  // namespace quilt::cpu
