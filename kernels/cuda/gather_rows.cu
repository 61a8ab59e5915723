#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

// One block per output row. An index outside [0, T) (the model rejects those) gives zeros
// rather than a read outside x.
template <typename T>
__global__ void gather_rows_kernel(T* __restrict__ out,            // [M, H]
                                   const T* __restrict__ x,        // [T, H]
                                   const int32_t* __restrict__ idx,  // [M]
                                   int64_t T_, int64_t H) {
  const int64_t m = blockIdx.x, r = idx[m];
  T* o = out + m * H;
  if (r < 0 || r >= T_) {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) o[h] = from_f<T>(0.f);
    return;
  }
  const T* src = x + r * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) o[h] = src[h];
}

}  // namespace

void gather_rows(Context& c, Tensor& out, const Tensor& x, const Tensor& indices) {
  const int64_t M = indices.numel(), H = x.dim(1), T = x.dim(0);
  QUILT_ASSERT(out.dim(0) == M && out.dim(1) == H, "gather_rows ", out.describe(), " from ", x.describe());
  expect(out, c.dtype, "gather_rows", "out");
  expect(x, c.dtype, "gather_rows", "x");
  expect(indices, DType::i32, "gather_rows", "indices");
  if (M == 0) return;
  dispatch(c.dtype, "gather_rows", [&](auto tag) {
    using T_ = decltype(tag);
    gather_rows_kernel<T_><<<M, threads_for(H, 256), 0, c.stream>>>(out.as<T_>(), x.as<T_>(),
                                                                     indices.as<int32_t>(), T, H);
  });
  check_launch("gather_rows");
}

}  // namespace quilt::cuda
