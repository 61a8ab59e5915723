#include <cstring>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

void embedding(Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start, float scale) {
  const int64_t T = out.dim(0), H = out.dim(1), V = table.dim(0);
  QUILT_ASSERT(table.dim(1) == H && ids.numel() == T);
  const int32_t* id = ids.as<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    float* o = out.as<float>() + t * H;
    const int64_t row = static_cast<int64_t>(id[t]) - vocab_start;
    if (row < 0 || row >= V) {
      std::memset(o, 0, H * sizeof(float));
      continue;
    }
    const float* e = table.as<float>() + row * H;
    for (int64_t h = 0; h < H; ++h) o[h] = e[h] * scale;
  }
}

}  // namespace quilt::cpu
