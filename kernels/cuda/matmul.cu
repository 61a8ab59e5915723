#include <climits>

#include "kernels/cuda/ops.h"

namespace quilt::cuda {

// y[M, N] = x[M, K] w[N, K]^T (+ y). Read column-major, row-major y is C[N, M] = w x^T:
// gemm(T, N) with A = w stored K x N (ld K) and B = x stored K x M (ld K).
// fp32 accumulation in every dtype (CUBLAS_COMPUTE_32F; pedantic, so no TF32, in f32 mode).
void matmul(Context& c, Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  QUILT_ASSERT(x.rank() == 2 && w.rank() == 2 && w.dim(1) == K && y.dim(0) == M && y.dim(1) == N,
               "matmul ", y.describe(), " = ", x.describe(), " x ", w.describe(), "^T");
  QUILT_ASSERT(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX);
  expect(y, c.dtype, "matmul", "y");
  expect(x, c.dtype, "matmul", "x");
  expect(w, c.dtype, "matmul", "w");
  if (M == 0 || N == 0) return;
  cudaDataType_t dt = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
  if (c.dtype == DType::bf16) {
    dt = CUDA_R_16BF;
    compute = CUBLAS_COMPUTE_32F;
  } else if (c.dtype == DType::f16) {
    dt = CUDA_R_16F;
    compute = CUBLAS_COMPUTE_32F;
  }
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  check_cublas(cublasGemmEx(c.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w.data(), dt, k,
                            x.data(), dt, k, &beta, y.data(), dt, n, compute, CUBLAS_GEMM_DEFAULT),
               "matmul");
  check_launch("matmul");
}

}  // namespace quilt::cuda
