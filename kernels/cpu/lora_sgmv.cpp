#include <cblas.h>

#include <vector>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

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
    v.resize(static_cast<size_t>(n * r));
    // v[n, r] = x[rows] A^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(r), static_cast<int>(K),
                1.0f, x.as<float>() + s.row_begin * K, static_cast<int>(K), s.A->as<float>(), static_cast<int>(K), 0.0f,
                v.data(), static_cast<int>(r));
    // y[rows, col_offset:] += v B^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(N), static_cast<int>(r),
                1.0f, v.data(), static_cast<int>(r), s.B->as<float>(), static_cast<int>(r), 1.0f,
                y.as<float>() + s.row_begin * ld_y + col_offset, static_cast<int>(ld_y));
  }
}

}  // namespace quilt::cpu
