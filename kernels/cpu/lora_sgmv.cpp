#include <vector>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// Plain loops rather than BLAS: the shapes are thin (rank 4..64 by a handful of rows), where a
// threaded GEMM call costs more in dispatch than the arithmetic.
void lora_sgmv(Tensor& y, const Tensor& x, const std::vector<LoraSegment>& segments, int64_t col_offset) {
  const int64_t T = x.dim(0), K = x.dim(1), ld_y = y.dim(1);
  QUILT_ASSERT(y.dim(0) == T);
  std::vector<float> v;
  for (const LoraSegment& s : segments) {
    const int64_t n = s.row_end - s.row_begin;
    if (n <= 0) continue;
    const int64_t r = s.A->dim(0), N = s.B->dim(0);
    QUILT_ASSERT(s.row_begin >= 0 && s.row_end <= T, "segment rows out of range");
    QUILT_ASSERT(s.A->dim(1) == K && s.B->dim(1) == r && col_offset + N <= ld_y, "LoRA shapes: x ", x.describe(),
                 " A ", s.A->describe(), " B ", s.B->describe(), " y ", y.describe(), " at column ", col_offset);
    const float* A = s.A->as<float>();
    const float* B = s.B->as<float>();
    v.assign(static_cast<size_t>(r), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float* xr = x.as<float>() + (s.row_begin + i) * K;
      // shrink: v = A x (fp32)
      for (int64_t k = 0; k < r; ++k) {
        const float* a = A + k * K;
        float acc = 0;
        for (int64_t j = 0; j < K; ++j) acc += a[j] * xr[j];
        v[k] = acc;
      }
      // expand: y[col_offset + o] += B[o] . v
      float* yr = y.as<float>() + (s.row_begin + i) * ld_y + col_offset;
      for (int64_t o = 0; o < N; ++o) {
        const float* b = B + o * r;
        float acc = 0;
        for (int64_t k = 0; k < r; ++k) acc += b[k] * v[k];
        yr[o] += acc;
      }
    }
  }
}

}  // namespace quilt::cpu
