#include <cblas.h>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

void matmul(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  QUILT_ASSERT(w.dim(1) == K && y.dim(0) == M && y.dim(1) == N, "matmul ", y.describe(), " = ",
               x.describe(), " x ", w.describe(), "^T");
  if (M == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), 1.0f, x.as<float>(), static_cast<int>(K), w.as<float>(),
              static_cast<int>(K), accumulate ? 1.0f : 0.0f, y.as<float>(), static_cast<int>(N));
}

}  // namespace quilt::cpu
