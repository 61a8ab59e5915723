#include "kernels/cpu/cpu_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"
#ifdef QUILT_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace quilt {

void Backend::lora_sgmv(Tensor&, const Tensor&, const std::vector<LoraSegment>&, int64_t) {
  QUILT_FAIL("backend '", name(), "' has no LoRA kernel yet: serve adapters with the cpu backend");
}

void Backend::lora_sgmv_multi(Tensor& y, const Tensor& x, const std::vector<LoraProblem>& problems) {
  for (const LoraProblem& p : problems)
    if (!p.segments.empty()) lora_sgmv(y, x, p.segments, p.col_offset);
}

void Backend::lora_shrink(const LoraStep&, int, const LoraGroup&, const Tensor&) {
  QUILT_FAIL("backend '", name(), "' has no LoRA kernel yet: serve adapters with the cpu backend");
}

void Backend::lora_expand(const LoraStep&, int, const LoraGroup&, Tensor&) {
  QUILT_FAIL("backend '", name(), "' has no LoRA kernel yet: serve adapters with the cpu backend");
}

void Backend::lora_expand_gelu(const LoraStep&, int, const LoraGroup&, const Tensor&, Tensor&) {
  QUILT_FAIL("backend '", name(), "' has no LoRA kernel yet: serve adapters with the cpu backend");
}

std::unique_ptr<BackendGraph> Backend::capture_graph(const std::function<void()>&) {
  QUILT_FAIL("backend '", name(), "' cannot record graphs");
}

std::vector<std::string> compiled_backends() {
#ifdef QUILT_HAVE_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& name, const BackendOptions& options) {
  if (name == "cpu") {
    QUILT_REQUIRE(!options.compute_dtype || *options.compute_dtype == DType::f32,
                  "backend 'cpu' computes in f32 only, not ", dtype_name(*options.compute_dtype));
    return make_cpu_backend();
  }
#ifdef QUILT_HAVE_CUDA
  if (name == "cuda") return make_cuda_backend(options);
#else
  QUILT_REQUIRE(name != "cuda", "backend 'cuda' was not compiled into this build (configure with nvcc available or -DQUILT_CUDA=ON)");
#endif
  QUILT_FAIL("unknown backend '", name, "' (expected cpu or cuda)");
}

}  // namespace quilt
