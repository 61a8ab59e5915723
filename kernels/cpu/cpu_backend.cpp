#include "kernels/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt {
namespace {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  Device device() const override { return Device::cpu; }
  DType compute_dtype() const override { return DType::f32; }

  Tensor empty(const std::vector<int64_t>& shape, DType dtype) override {
    Tensor probe(nullptr, nullptr, dtype, Device::cpu, shape);
    const size_t bytes = std::max<size_t>(probe.bytes(), 64);
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    QUILT_REQUIRE(p != nullptr, "out of host memory allocating ", probe.describe());
    std::shared_ptr<void> storage(p, [](void* q) { std::free(q); });
    return Tensor(storage, p, dtype, Device::cpu, shape);
  }
  Tensor zeros(const std::vector<int64_t>& shape, DType dtype) override {
    Tensor t = empty(shape, dtype);
    std::memset(t.data(), 0, t.bytes());
    return t;
  }
  Tensor from_host(const void* src, DType src_dtype, const std::vector<int64_t>& shape) override {
    Tensor t = empty(shape, DType::f32);
    convert_to_f32(t.as<float>(), src, src_dtype, t.numel());
    return t;
  }
  Tensor from_host_i32(const int32_t* src, const std::vector<int64_t>& shape) override {
    Tensor t = empty(shape, DType::i32);
    if (t.numel()) std::memcpy(t.data(), src, t.bytes());
    return t;
  }
  void upload_i32(Tensor& dst, const int32_t* src) override {
    QUILT_ASSERT(dst.dtype() == DType::i32 && dst.device() == Device::cpu);
    if (dst.numel()) std::memcpy(dst.data(), src, dst.bytes());
  }
  void to_host_f32(float* dst, const Tensor& src) override {
    QUILT_ASSERT(src.dtype() == DType::f32);
    if (src.numel()) std::memcpy(dst, src.data(), src.bytes());
  }
  void copy(Tensor& dst, const Tensor& src) override {
    QUILT_ASSERT(dst.bytes() == src.bytes() && dst.dtype() == src.dtype());
    if (src.numel()) std::memmove(dst.data(), src.data(), src.bytes());
  }

  void embedding(Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start,
                 float scale) override {
    cpu::embedding(out, table, ids, vocab_start, scale);
  }
  void rms_norm(Tensor& out, const Tensor& x, const Tensor& w, float eps) override {
    cpu::rms_norm(out, x, w, eps);
  }
  void add_rms_norm(Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w,
                    float eps) override {
    cpu::add_rms_norm(residual, out, x, w, eps);
  }
  void matmul(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) override {
    cpu::matmul(y, x, w, accumulate);
  }
  void rope(Tensor& qkv, const Tensor& positions, const RopeParams& p) override {
    cpu::rope(qkv, positions, p);
  }
  void write_kv_cache(Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& slots,
                      const KvWriteParams& p) override {
    cpu::write_kv_cache(k_cache, v_cache, qkv, slots, p);
  }
  void paged_attention(Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                       const Tensor& v_cache, const Tensor& cu_seqlens, const Tensor& seqlens,
                       const Tensor& block_tables, const AttentionParams& p) override {
    cpu::paged_attention(out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, p);
  }
  void gelu_tanh_mul(Tensor& out, const Tensor& gate_up) override {
    cpu::gelu_tanh_mul(out, gate_up);
  }
  void gather_rows(Tensor& out, const Tensor& x, const Tensor& indices) override {
    cpu::gather_rows(out, x, indices);
  }
  void lora_sgmv(Tensor& y, const Tensor& x, const std::vector<LoraSegment>& segments,
                 int64_t col_offset) override {
    cpu::lora_sgmv(y, x, segments, col_offset);
  }
  void lora_shrink(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& x) override {
    cpu::lora_shrink(step, layer, group, x);
  }
  void lora_expand(const LoraStep& step, int layer, const LoraGroup& group, Tensor& y) override {
    cpu::lora_expand(step, layer, group, y);
  }
  void lora_expand_gelu(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& gate_up,
                        Tensor& out) override {
    cpu::lora_expand_gelu(step, layer, group, gate_up, out);
  }
  void sample(SampleResult& out, const Tensor& logits, const SampleBatch& batch) override {
    cpu::sample(out, logits, batch);
  }
  using Backend::kv_cache_tensor;
  Tensor kv_cache_tensor(int64_t num_blocks, int block_size, int num_kv_heads, int head_dim,
                         DType dtype) override {
    QUILT_REQUIRE(dtype == DType::f32, "backend 'cpu': a KV cache in ", dtype_name(dtype),
                  " is not supported (the cpu backend keeps it in f32; fp8_e4m3 needs the cuda backend)");
    return zeros({num_blocks * block_size, num_kv_heads, head_dim}, DType::f32);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace quilt
