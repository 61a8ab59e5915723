#include <climits>

#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.cuh"

namespace quilt::cuda {
namespace {

// One block per token; fp32 throughout, one rounding at the store; Gemma's weight is applied as
// (1 + w). ADD: residual += x first, rounded to T as the reference's add, and the norm is taken
// of the rounded sum.
//
// Vector path (16-byte aligned rows, H % kVec == 0, H <= 1024 threads x 2 vectors): each thread
// keeps its R vectors of x (or of the new residual) and of w in registers, so the row is read
// once, and w's loads are in flight during the block reduction. Decode (one token, H = 2048 or
// 3072) is one vector per thread. Launched with PDL (pdl.cuh): it waits for the previous kernel
// first thing and lets the next one (a GEMV, which starts prefetching its weights) launch.
template <typename T, bool ADD, int R>
__global__ void __launch_bounds__(1024) rms_norm_vec_kernel(T* __restrict__ out,       // [T, H]
                                    T* __restrict__ residual,  // [T, H], ADD only
                                    const T* __restrict__ x,   // [T, H]
                                    const T* __restrict__ w,   // [H]
                                    int64_t H, float eps) {
  pdl_launch_dependents();
  pdl_wait();
  constexpr int N = kVec<T>;
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const T* xr = x + t * H;
  T* rr = ADD ? residual + t * H : nullptr;
  float a[R][N], g[R][N];
  float ss = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t h = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * N;
    if (h < H) {
      load_vec(xr + h, a[r]);
      load_vec(w + h, g[r]);
      if constexpr (ADD) {
        float s[N];
        load_vec(rr + h, s);
#pragma unroll
        for (int i = 0; i < N; ++i) a[r][i] = to_f(from_f<T>(s[i] + a[r][i]));
        store_vec(rr + h, a[r]);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) ss += a[r][i] * a[r][i];
    }
  }
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);
  T* o = out + t * H;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t h = (static_cast<int64_t>(r) * blockDim.x + threadIdx.x) * N;
    if (h < H) {
#pragma unroll
      for (int i = 0; i < N; ++i) a[r][i] = (a[r][i] * inv) * (1.0f + g[r][i]);
      store_vec(o + h, a[r]);
    }
  }
}

// Any H and alignment: element loop, x (or the residual) read again from L1/L2 for the output.
template <typename T, bool ADD>
__global__ void __launch_bounds__(512) rms_norm_kernel(T* __restrict__ out,       // [T, H]
                                T* __restrict__ residual,  // [T, H], ADD only
                                const T* __restrict__ x,   // [T, H]
                                const T* __restrict__ w,   // [H]
                                int64_t H, float eps) {
  pdl_launch_dependents();
  pdl_wait();
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const T* xr = x + t * H;
  T* rr = ADD ? residual + t * H : nullptr;
  T* o = out + t * H;
  const T* src = ADD ? rr : xr;
  float ss = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float a = to_f(xr[h]);
    if constexpr (ADD) {
      const T sum = from_f<T>(to_f(rr[h]) + a);
      rr[h] = sum;
      a = to_f(sum);
    }
    ss += a * a;
  }
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);
  // Each thread reads back only the elements it wrote (ADD), so no barrier is needed.
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    o[h] = from_f<T>((to_f(src[h]) * inv) * (1.0f + to_f(w[h])));
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
  QUILT_ASSERT(T <= INT_MAX, op, ": ", T, " tokens");
  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    constexpr int N = kVec<T_>;
    T_* r = ADD ? residual->as<T_>() : nullptr;
    const bool vec = H % N == 0 && aligned16(out.data()) && aligned16(x.data()) && aligned16(w.data()) &&
                     (!ADD || aligned16(r));
    const int64_t vecs = H / N;
    const dim3 grid(static_cast<unsigned>(T));
    if (vec && vecs <= 2 * 1024) {
      const int R = vecs <= 1024 ? 1 : 2;
      const int threads = threads_for((vecs + R - 1) / R, 1024);
      auto run = [&](auto kernel) {
        launch_pdl(c, op, kernel, grid, dim3(threads), 0, out.as<T_>(), r, x.as<T_>(), w.as<T_>(), H, eps);
      };
      if (R == 1) run(rms_norm_vec_kernel<T_, ADD, 1>);
      else run(rms_norm_vec_kernel<T_, ADD, 2>);
    } else {
      launch_pdl(c, op, rms_norm_kernel<T_, ADD>, grid, dim3(threads_for(H, 512)), 0, out.as<T_>(), r, x.as<T_>(),
                 w.as<T_>(), H, eps);
    }
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
