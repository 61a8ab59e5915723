#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace quilt::cuda {
namespace {

// One block per token. VEC: rows are 16-byte aligned and H is a multiple of kVec<T>. Launched
// the usual way (it follows the step's uploads); it lets the next kernel (rms_norm) launch early.
template <typename T, bool VEC>
__global__ void embedding_kernel(T* __restrict__ out,          // [T, H]
                                 const T* __restrict__ table,  // [V, H]
                                 const int32_t* __restrict__ ids,  // [T]
                                 int64_t V, int64_t H, int64_t vocab_start, float scale) {
  pdl_launch_dependents();
  const int64_t t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(ids[t]) - vocab_start;
  T* o = out + t * H;
  const bool mine = row >= 0 && row < V;
  const T* e = table + (mine ? row : 0) * H;
  if constexpr (VEC) {
    constexpr int N = kVec<T>;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * N; h < H; h += static_cast<int64_t>(blockDim.x) * N) {
      float f[N];
      if (mine) {
        load_vec(e + h, f);
#pragma unroll
        for (int i = 0; i < N; ++i) f[i] *= scale;
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) f[i] = 0.f;
      }
      store_vec(o + h, f);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
      o[h] = from_f<T>(mine ? to_f(e[h]) * scale : 0.f);
  }
}

}  // namespace

void embedding(Context& c, Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start,
               float scale) {
  const int64_t T = out.dim(0), H = out.dim(1), V = table.dim(0);
  QUILT_ASSERT(table.dim(1) == H && ids.numel() == T, "embedding ", out.describe(), " from ",
               table.describe(), " with ids ", ids.describe());
  expect(out, c.dtype, "embedding", "out");
  expect(table, c.dtype, "embedding", "table");
  expect(ids, DType::i32, "embedding", "ids");
  if (T == 0) return;
  // The reference multiplies by sqrt(hidden) held in the activation dtype.
  float s = scale;
  if (c.dtype == DType::bf16) s = __bfloat162float(__float2bfloat16_rn(scale));
  if (c.dtype == DType::f16) s = __half2float(__float2half_rn(scale));
  dispatch(c.dtype, "embedding", [&](auto tag) {
    using T_ = decltype(tag);
    const bool vec = H % kVec<T_> == 0 && aligned16(out.data()) && aligned16(table.data());
    const int threads = threads_for(vec ? H / kVec<T_> : H, 256);
    if (vec)
      embedding_kernel<T_, true><<<T, threads, 0, c.stream>>>(out.as<T_>(), table.as<T_>(), ids.as<int32_t>(), V, H, vocab_start, s);
    else
      embedding_kernel<T_, false><<<T, threads, 0, c.stream>>>(out.as<T_>(), table.as<T_>(), ids.as<int32_t>(), V, H, vocab_start, s);
  });
  check_launch("embedding");
}

}  // namespace quilt::cuda
