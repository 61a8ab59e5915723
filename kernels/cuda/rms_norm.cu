#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

// One block per token: x (or residual += x, rounded to T as the reference's add) is read once
// for the sum of squares and again, from L1/L2, for the output. fp32 throughout; one rounding
// at the store. Gemma's weight is applied as (1 + w).
template <typename T, bool ADD, bool VEC>
__global__ void rms_norm_kernel(T* __restrict__ out,       // [T, H]
                                T* __restrict__ residual,  // [T, H], ADD only
                                const T* __restrict__ x,   // [T, H]
                                const T* __restrict__ w,   // [H]
                                int64_t H, float eps) {
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const T* xr = x + t * H;
  T* rr = ADD ? residual + t * H : nullptr;
  T* o = out + t * H;
  const T* src = ADD ? rr : xr;
  float ss = 0.f;
  if constexpr (VEC) {
    constexpr int N = kVec<T>;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * N; h < H; h += static_cast<int64_t>(blockDim.x) * N) {
      float a[N];
      load_vec(xr + h, a);
      if constexpr (ADD) {
        float r[N];
        load_vec(rr + h, r);
#pragma unroll
        for (int i = 0; i < N; ++i) a[i] = to_f(from_f<T>(r[i] + a[i]));
        store_vec(rr + h, a);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) ss += a[i] * a[i];
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float a = to_f(xr[h]);
      if constexpr (ADD) {
        const T sum = from_f<T>(to_f(rr[h]) + a);
        rr[h] = sum;
        a = to_f(sum);
      }
      ss += a * a;
    }
  }
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);
  // Each thread reads back only the elements it wrote (ADD), so no barrier is needed.
  if constexpr (VEC) {
    constexpr int N = kVec<T>;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * N; h < H; h += static_cast<int64_t>(blockDim.x) * N) {
      float a[N], g[N];
      load_vec(src + h, a);
      load_vec(w + h, g);
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] = (a[i] * inv) * (1.0f + g[i]);
      store_vec(o + h, a);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
      o[h] = from_f<T>((to_f(src[h]) * inv) * (1.0f + to_f(w[h])));
  }
}

template <bool ADD>
void launch(Context& c, Tensor* residual, Tensor& out, const Tensor& x, const Tensor& w, float eps,
            const char* op) {
  const int64_t T = x.dim(0), H = x.dim(1);
  QUILT_ASSERT(out.numel() == T * H && w.numel() == H, op, " ", out.describe(), " of ", x.describe(),
               " with ", w.describe());
  expect(out, c.dtype, op, "out");
  expect(x, c.dtype, op, "x");
  expect(w, c.dtype, op, "w");
  if (ADD) {
    QUILT_ASSERT(residual->numel() == T * H);
    expect(*residual, c.dtype, op, "residual");
  }
  if (T == 0) return;
  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    T_* r = ADD ? residual->as<T_>() : nullptr;
    const bool vec = H % kVec<T_> == 0 && aligned16(out.data()) && aligned16(x.data()) &&
                     aligned16(w.data()) && (!ADD || aligned16(r));
    const int threads = threads_for(vec ? H / kVec<T_> : H, vec ? 256 : 512);
    if (vec)
      rms_norm_kernel<T_, ADD, true><<<T, threads, 0, c.stream>>>(out.as<T_>(), r, x.as<T_>(), w.as<T_>(), H, eps);
    else
      rms_norm_kernel<T_, ADD, false><<<T, threads, 0, c.stream>>>(out.as<T_>(), r, x.as<T_>(), w.as<T_>(), H, eps);
  });
  check_launch(op);
}

}  // namespace

void rms_norm(Context& c, Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  launch<false>(c, nullptr, out, x, w, eps, "rms_norm");
}

void add_rms_norm(Context& c, Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  launch<true>(c, &residual, out, x, w, eps, "add_rms_norm");
}

}  // namespace quilt::cuda
