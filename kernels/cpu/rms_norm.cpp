#include <cmath>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {
namespace {
void norm_row(float* o, const float* x, const float* w, int64_t H, float eps) {
  double ss = 0;
  for (int64_t h = 0; h < H; ++h) ss += static_cast<double>(x[h]) * x[h];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + eps);
  for (int64_t h = 0; h < H; ++h) o[h] = (x[h] * inv) * (1.0f + w[h]);
}
}  // namespace

void rms_norm(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  const int64_t T = x.dim(0), H = x.dim(1);
  QUILT_ASSERT(out.numel() == T * H && w.numel() == H);
  for (int64_t t = 0; t < T; ++t)
    norm_row(out.as<float>() + t * H, x.as<float>() + t * H, w.as<float>(), H, eps);
}

void add_rms_norm(Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  const int64_t T = x.dim(0), H = x.dim(1);
  QUILT_ASSERT(residual.numel() == T * H && out.numel() == T * H && w.numel() == H);
  for (int64_t t = 0; t < T; ++t) {
    float* r = residual.as<float>() + t * H;
    const float* xr = x.as<float>() + t * H;
    for (int64_t h = 0; h < H; ++h) r[h] += xr[h];
    norm_row(out.as<float>() + t * H, r, w.as<float>(), H, eps);
  }
}

}  // namespace quilt::cpu
