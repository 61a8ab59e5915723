// The CUDA backend: memory on one stream-ordered pool, one stream, one cuBLAS handle; the ops
// live in the file of their name (ops.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kv_fp8.cuh"
#include "kernels/cuda/ops.h"

namespace quilt {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

namespace cuda {
Context::~Context() {
  // Errors are ignored here: a destructor cannot report them, and a broken context is gone anyway.
  cudaSetDevice(device);
  if (stream) cudaStreamSynchronize(stream);
  if (cublas) cublasDestroy(cublas);
  if (workspace) cudaFree(workspace);
  if (scratch_ptr) cudaFree(scratch_ptr);
  if (counters) cudaFree(counters);
  if (up_host) cudaFreeHost(up_host);
  if (down_host) cudaFreeHost(down_host);
  if (lora_stream) cudaStreamSynchronize(lora_stream);
  if (lora_fork) cudaEventDestroy(lora_fork);
  if (lora_join) cudaEventDestroy(lora_join);
  if (lora_stream) cudaStreamDestroy(lora_stream);
  if (stream) cudaStreamDestroy(stream);
}

void* Context::scratch(size_t bytes, const char* op) {
  if (bytes <= scratch_bytes) return scratch_ptr;
  // Stream order makes the swap safe: kernels still using the old buffer run before it is freed.
  const size_t grown = std::max(bytes, scratch_bytes * 2);
  if (scratch_ptr) check(cudaFreeAsync(scratch_ptr, stream), op);
  scratch_ptr = nullptr;
  scratch_bytes = 0;
  check(cudaMallocAsync(&scratch_ptr, grown, stream), op);
  scratch_bytes = grown;
  ++scratch_epoch;
  return scratch_ptr;
}

char* Context::staging(size_t bytes, const char* op) {
  const size_t need = (bytes + 255) / 256 * 256;
  if (up_used + need > up_bytes) {
    // Every staged byte may still be in flight: wait for the stream, then start over (bigger if
    // this one upload does not fit).
    check(cudaStreamSynchronize(stream), op);
    up_used = 0;
    if (need > up_bytes) {
      check(cudaFreeHost(up_host), op);
      up_host = nullptr;
      up_bytes = 0;
      const size_t grown = std::max(need, 2 * up_bytes_initial);
      check(cudaMallocHost(&up_host, grown), op);
      up_bytes = grown;
    }
  }
  return static_cast<char*>(up_host) + up_used;
}

void Context::upload_staged(void* device_dst, const char* staged, size_t bytes, const char* op) {
  QUILT_ASSERT(staged == static_cast<char*>(up_host) + up_used, op, ": upload_staged without staging()");
  check(cudaMemcpyAsync(device_dst, staged, bytes, cudaMemcpyHostToDevice, stream), op);
  up_used += (bytes + 255) / 256 * 256;
}

void Context::stage_upload(void* device_dst, const void* src, size_t bytes, const char* op) {
  char* staged = staging(bytes, op);
  std::memcpy(staged, src, bytes);
  upload_staged(device_dst, staged, bytes, op);
}
}  // namespace cuda

namespace {

constexpr size_t kCublasWorkspace = size_t{32} << 20;  // Hopper's recommended size
constexpr size_t kUploadStaging = size_t{4} << 20;     // a step's i32 inputs, many times over
constexpr size_t kCounters = 16384;                    // split rows x KV heads: < 2 blocks per SM
constexpr size_t kDownloadStaging = size_t{2} << 20;   // batch-1 bf16 logits of a 256k vocabulary, x4

// Host staging: n values of `src_dtype` converted to `dst` dtype (f32, bf16 or f16).
std::vector<uint8_t> convert_host(const void* src, DType src_dtype, DType dst, size_t n) {
  std::vector<uint8_t> out(n * dtype_size(dst));
  if (src_dtype == dst) {
    std::memcpy(out.data(), src, out.size());
    return out;
  }
  if (dst == DType::f32) {
    convert_to_f32(reinterpret_cast<float*>(out.data()), src, src_dtype, n);
    return out;
  }
  auto* o = reinterpret_cast<uint16_t*>(out.data());
  constexpr size_t kChunk = 4096;
  float buf[kChunk];
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t m = std::min(kChunk, n - i);
    convert_to_f32(buf, static_cast<const uint8_t*>(src) + i * dtype_size(src_dtype), src_dtype, m);
    if (dst == DType::bf16) {
      for (size_t k = 0; k < m; ++k) o[i + k] = f32_to_bf16(buf[k]);
    } else {
      for (size_t k = 0; k < m; ++k) {
        const __half h = __float2half_rn(buf[k]);
        std::memcpy(&o[i + k], &h, 2);
      }
    }
  }
  return out;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const BackendOptions& o) : ctx_(std::make_shared<cuda::Context>()) {
    const int n = cuda_device_count();
    QUILT_REQUIRE(n > 0, "backend 'cuda': no CUDA device is visible to this process");
    QUILT_REQUIRE(o.device >= 0 && o.device < n, "backend 'cuda': device ", o.device,
                  " requested but ", n, " device(s) are visible");
    const DType dt = o.compute_dtype.value_or(DType::bf16);
    QUILT_REQUIRE(dt == DType::bf16 || dt == DType::f32 || dt == DType::f16,
                  "backend 'cuda': compute dtype must be bf16, f16 or f32, not ", dtype_name(dt));
    cuda::Context& c = *ctx_;
    c.device = o.device;
    c.dtype = dt;
    cuda::check(cudaSetDevice(c.device), "init: cudaSetDevice");
    cuda::check(cudaDeviceGetAttribute(&c.num_sms, cudaDevAttrMultiProcessorCount, c.device), "init: SM count");
    cuda::check(cudaMalloc(&c.counters, kCounters * sizeof(int)), "init: counters");
    cuda::check(cudaMemset(c.counters, 0, kCounters * sizeof(int)), "init: counters");
    c.counter_count = kCounters;
    cuda::check(cudaMallocHost(&c.up_host, kUploadStaging), "init: pinned upload staging");
    c.up_bytes = kUploadStaging;
    c.up_bytes_initial = kUploadStaging;
    cuda::check(cudaMallocHost(&c.down_host, kDownloadStaging), "init: pinned download staging");
    c.down_bytes = kDownloadStaging;
    cuda::check(cudaStreamCreateWithFlags(&c.stream, cudaStreamNonBlocking), "init: stream");
    cuda::check(cudaStreamCreateWithFlags(&c.lora_stream, cudaStreamNonBlocking), "init: LoRA stream");
    cuda::check(cudaEventCreateWithFlags(&c.lora_fork, cudaEventDisableTiming), "init: LoRA events");
    cuda::check(cudaEventCreateWithFlags(&c.lora_join, cudaEventDisableTiming), "init: LoRA events");
    // Keep freed blocks in the stream-ordered pool instead of returning them to the driver at
    // every synchronisation: steps then allocate without touching the driver.
    cudaMemPool_t pool;
    cuda::check(cudaDeviceGetDefaultMemPool(&pool, c.device), "init: memory pool");
    uint64_t keep = UINT64_MAX;
    cuda::check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "init: memory pool");
    cuda::check_cublas(cublasCreate(&c.cublas), "init: cublasCreate");
    cuda::check_cublas(cublasSetStream(c.cublas, c.stream), "init: cublasSetStream");
    cuda::check(cudaMalloc(&c.workspace, kCublasWorkspace), "init: cuBLAS workspace");
    c.workspace_bytes = kCublasWorkspace;
    cuda::check_cublas(cublasSetWorkspace(c.cublas, c.workspace, c.workspace_bytes), "init: cublasSetWorkspace");
    // f32 must match the CPU: no TF32. bf16/f16: fp32 accumulation, and no split-K reduction in
    // the 16-bit output type.
    const cublasMath_t math = dt == DType::f32
                                  ? CUBLAS_PEDANTIC_MATH
                                  : static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                              CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    cuda::check_cublas(cublasSetMathMode(c.cublas, math), "init: cublasSetMathMode");
  }

  std::string name() const override { return "cuda"; }
  Device device() const override { return Device::cuda; }
  DType compute_dtype() const override { return ctx_->dtype; }

  Tensor empty(const std::vector<int64_t>& shape, DType dtype) override {
    Tensor probe(nullptr, nullptr, dtype, Device::cuda, shape);
    const size_t bytes = std::max<size_t>(probe.bytes(), 256);
    void* p = nullptr;
    set_device();
    const cudaError_t e = cudaMallocAsync(&p, bytes, ctx_->stream);
    if (e != cudaSuccess) {
      cudaGetLastError();  // an allocation failure is not sticky; clear it
      QUILT_FAIL("cuda backend: out of GPU memory allocating ", probe.describe(), " (",
                 bytes >> 20, " MiB): ", cudaGetErrorString(e));
    }
    std::shared_ptr<cuda::Context> ctx = ctx_;
    std::shared_ptr<void> storage(p, [ctx](void* q) {
      cudaSetDevice(ctx->device);
      cudaFreeAsync(q, ctx->stream);
    });
    return Tensor(storage, p, dtype, Device::cuda, shape);
  }
  Tensor zeros(const std::vector<int64_t>& shape, DType dtype) override {
    Tensor t = empty(shape, dtype);
    if (t.numel()) cuda::check(cudaMemsetAsync(t.data(), 0, t.bytes(), ctx_->stream), "zeros");
    return t;
  }
  Tensor from_host(const void* src, DType src_dtype, const std::vector<int64_t>& shape) override {
    QUILT_ASSERT(src_dtype == DType::f32 || src_dtype == DType::f16 || src_dtype == DType::bf16);
    Tensor t = empty(shape, ctx_->dtype);
    if (t.numel() == 0) return t;
    const std::vector<uint8_t> host = convert_host(src, src_dtype, ctx_->dtype, t.numel());
    upload(t, host.data(), "from_host");
    return t;
  }
  // Through the pinned staging buffer, asynchronously: no synchronisation per upload.
  Tensor from_host_i32(const int32_t* src, const std::vector<int64_t>& shape) override {
    Tensor t = empty(shape, DType::i32);
    if (t.numel()) stage_upload(t.data(), src, t.bytes(), "from_host_i32");
    return t;
  }
  void upload_i32(Tensor& dst, const int32_t* src) override {
    QUILT_ASSERT(dst.device() == Device::cuda && dst.dtype() == DType::i32, "upload_i32 into ", dst.describe());
    if (dst.numel()) stage_upload(dst.data(), src, dst.bytes(), "upload_i32");
  }
  bool supports_graphs() const override { return true; }
  std::unique_ptr<BackendGraph> capture_graph(const std::function<void()>& body) override;
  uint64_t graph_epoch() const override { return ctx_->scratch_epoch; }
  std::pair<size_t, size_t> memory_info() override {
    set_device();
    size_t free_b = 0, total_b = 0;
    cuda::check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    return {free_b, total_b};
  }
  void to_host_f32(float* dst, const Tensor& src) override {
    QUILT_ASSERT(src.device() == Device::cuda && src.dtype() != DType::i32, "to_host_f32 of ", src.describe());
    if (src.numel() == 0) return;
    set_device();
    cuda::Context& c = *ctx_;
    // Into pinned staging (a DMA at full PCIe speed), then converted on the host.
    if (src.bytes() > c.down_bytes) {
      cuda::check(cudaFreeHost(c.down_host), "to_host_f32: staging");
      c.down_host = nullptr;
      c.down_bytes = 0;
      cuda::check(cudaMallocHost(&c.down_host, src.bytes()), "to_host_f32: staging");
      c.down_bytes = src.bytes();
    }
    cuda::check(cudaMemcpyAsync(c.down_host, src.data(), src.bytes(), cudaMemcpyDeviceToHost, c.stream), "to_host_f32");
    cuda::check(cudaStreamSynchronize(c.stream), "to_host_f32");
    c.up_used = 0;  // every staged upload has landed
    if (src.dtype() == DType::f32)
      std::memcpy(dst, c.down_host, src.bytes());
    else
      convert_to_f32(dst, c.down_host, src.dtype(), static_cast<size_t>(src.numel()));
  }
  void copy(Tensor& dst, const Tensor& src) override {
    QUILT_ASSERT(dst.bytes() == src.bytes() && dst.dtype() == src.dtype() &&
                 dst.device() == Device::cuda && src.device() == Device::cuda);
    if (src.numel() == 0) return;
    set_device();
    cuda::check(cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice, ctx_->stream), "copy");
  }

  void embedding(Tensor& out, const Tensor& table, const Tensor& ids, int64_t vocab_start,
                 float scale) override {
    set_device();
    cuda::embedding(*ctx_, out, table, ids, vocab_start, scale);
  }
  void rms_norm(Tensor& out, const Tensor& x, const Tensor& w, float eps) override {
    set_device();
    cuda::rms_norm(*ctx_, out, x, w, eps);
  }
  void add_rms_norm(Tensor& residual, Tensor& out, const Tensor& x, const Tensor& w,
                    float eps) override {
    set_device();
    cuda::add_rms_norm(*ctx_, residual, out, x, w, eps);
  }
  void matmul(Tensor& y, const Tensor& x, const Tensor& w, bool accumulate) override {
    set_device();
    cuda::matmul(*ctx_, y, x, w, accumulate);
  }
  void rope(Tensor& qkv, const Tensor& positions, const RopeParams& p) override {
    set_device();
    cuda::rope(*ctx_, qkv, positions, p);
  }
  void write_kv_cache(Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& slots,
                      const KvWriteParams& p) override {
    set_device();
    cuda::write_kv_cache(*ctx_, k_cache, v_cache, qkv, slots, p);
  }
  void paged_attention(Tensor& out, const Tensor& qkv, const Tensor& k_cache,
                       const Tensor& v_cache, const Tensor& cu_seqlens, const Tensor& seqlens,
                       const Tensor& block_tables, const AttentionParams& p) override {
    set_device();
    cuda::paged_attention(*ctx_, out, qkv, k_cache, v_cache, cu_seqlens, seqlens, block_tables, p);
  }
  void gelu_tanh_mul(Tensor& out, const Tensor& gate_up) override {
    set_device();
    cuda::gelu_tanh_mul(*ctx_, out, gate_up);
  }
  void gather_rows(Tensor& out, const Tensor& x, const Tensor& indices) override {
    set_device();
    cuda::gather_rows(*ctx_, out, x, indices);
  }
  void lora_sgmv(Tensor& y, const Tensor& x, const std::vector<LoraSegment>& segments,
                 int64_t col_offset) override {
    lora_sgmv_multi(y, x, {LoraProblem{segments, col_offset}});
  }
  void lora_sgmv_multi(Tensor& y, const Tensor& x, const std::vector<LoraProblem>& problems) override {
    set_device();
    cuda::lora_sgmv(*ctx_, y, x, problems,
                    [this](void* dst, const void* src, size_t n) { stage_upload(dst, src, n, "lora_sgmv"); });
  }
  void lora_shrink(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& x) override {
    set_device();
    cuda::lora_shrink(*ctx_, step, layer, group, x);
  }
  void lora_expand(const LoraStep& step, int layer, const LoraGroup& group, Tensor& y) override {
    set_device();
    cuda::lora_expand(*ctx_, step, layer, group, y);
  }
  void lora_expand_gelu(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& gate_up,
                        Tensor& out) override {
    set_device();
    cuda::lora_expand_gelu(*ctx_, step, layer, group, gate_up, out);
  }
  void sample(SampleResult& out, const Tensor& logits, const SampleBatch& batch) override {
    set_device();
    cuda::sample(*ctx_, out, logits, batch);
  }
  // Layout (backend-private): [num_blocks * block_size slots, num_kv_heads, head_dim], as the CPU;
  // fp8_e4m3 keeps its scales after the values in the same allocation (kv_fp8.cuh).
  using Backend::kv_cache_tensor;
  Tensor kv_cache_tensor(int64_t num_blocks, int block_size, int num_kv_heads, int head_dim,
                         DType dtype) override {
    QUILT_REQUIRE(dtype == ctx_->dtype || dtype == DType::fp8_e4m3, "backend 'cuda': a KV cache in ",
                  dtype_name(dtype), " is not supported with compute dtype ", dtype_name(ctx_->dtype),
                  " (the compute dtype or fp8_e4m3)");
    const int64_t slots = num_blocks * block_size;
    if (dtype != DType::fp8_e4m3) return zeros({slots, num_kv_heads, head_dim}, dtype);
    // One zeroed allocation of values and scales; the tensor views its values.
    const int64_t bytes = static_cast<int64_t>(cuda::kv_fp8_bytes(slots, num_kv_heads, head_dim));
    return zeros({bytes}, DType::fp8_e4m3).slice_rows(0, slots * num_kv_heads * head_dim).view({slots, num_kv_heads, head_dim});
  }
  size_t kv_cache_bytes_per_slot(int num_kv_heads, int head_dim, DType dtype) const override {
    // fp8: the e4m3 values and one fp32 scale per KV head.
    return static_cast<size_t>(num_kv_heads) * (dtype == DType::fp8_e4m3 ? head_dim + 4 : head_dim * dtype_size(dtype));
  }

  void synchronize() {
    set_device();
    cuda::check(cudaStreamSynchronize(ctx_->stream), "synchronize");
    ctx_->up_used = 0;
  }
  cuda::Context& context() { return *ctx_; }
  void fill_normal(Tensor& t, uint64_t seed, float stddev) {
    set_device();
    cuda::fill_normal(*ctx_, t, seed, stddev);
  }

 private:
  // The current device is per host thread; the worker's actor thread may not be the one that
  // made the backend.
  void set_device() { cuda::check(cudaSetDevice(ctx_->device), "cudaSetDevice"); }
  void stage_upload(void* dst, const void* src, size_t n, const char* op) {
    set_device();
    ctx_->stage_upload(dst, src, n, op);
  }
  // Pageable source (weights, at load time): the copy is complete (and `src` reusable) when
  // this returns.
  void upload(Tensor& t, const void* src, const char* op) {
    set_device();
    cuda::check(cudaMemcpyAsync(t.data(), src, t.bytes(), cudaMemcpyHostToDevice, ctx_->stream), op);
    cuda::check(cudaStreamSynchronize(ctx_->stream), op);
    ctx_->up_used = 0;
  }

  std::shared_ptr<cuda::Context> ctx_;
};

class CudaGraph final : public BackendGraph {
 public:
  CudaGraph(std::shared_ptr<cuda::Context> ctx, cudaGraph_t g, cudaGraphExec_t e)
      : ctx_(std::move(ctx)), graph_(g), exec_(e) {}
  ~CudaGraph() override {
    cudaSetDevice(ctx_->device);
    cudaStreamSynchronize(ctx_->stream);  // a replay may still be running
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }
  void launch() override {
    cuda::check(cudaSetDevice(ctx_->device), "graph launch: cudaSetDevice");
    cuda::check(cudaGraphLaunch(exec_, ctx_->stream), "cudaGraphLaunch");
  }

 private:
  std::shared_ptr<cuda::Context> ctx_;
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
};

std::unique_ptr<BackendGraph> CudaBackend::capture_graph(const std::function<void()>& body) {
  set_device();
  cuda::Context& c = *ctx_;
  // Relaxed: other threads' unrelated CUDA calls (the worker's adapter loads) stay legal while
  // this thread records; the body itself enqueues on our stream only.
  cuda::check(cudaStreamBeginCapture(c.stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
  const uint64_t epoch = c.scratch_epoch;
  try {
    body();
  } catch (...) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(c.stream, &g);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    throw;
  }
  cudaGraph_t g = nullptr;
  cuda::check(cudaStreamEndCapture(c.stream, &g), "cudaStreamEndCapture");
  QUILT_ASSERT(c.scratch_epoch == epoch, "capture_graph: an op grew its scratch while recording; run the body once first");
  cudaGraphExec_t e = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&e, g, 0);
  if (err != cudaSuccess) {
    cudaGraphDestroy(g);
    cuda::check(err, "cudaGraphInstantiate");
  }
  return std::make_unique<CudaGraph>(ctx_, g, e);
}

CudaBackend& as_cuda(Backend& b) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  QUILT_REQUIRE(c != nullptr, "backend '", b.name(), "' is not the cuda backend");
  return *c;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& options) {
  return std::make_unique<CudaBackend>(options);
}

void cuda_synchronize(Backend& backend) { as_cuda(backend).synchronize(); }

void cuda_fill_normal(Backend& backend, Tensor& t, uint64_t seed, float stddev) {
  as_cuda(backend).fill_normal(t, seed, stddev);
}

void* cuda_native_stream(Backend& backend) { return as_cuda(backend).context().stream; }

int cuda_device_ordinal(Backend& backend) { return as_cuda(backend).context().device; }

std::string cuda_device_name(Backend& backend) {
  cudaDeviceProp prop{};
  cuda::check(cudaGetDeviceProperties(&prop, as_cuda(backend).context().device), "cudaGetDeviceProperties");
  return prop.name;
}

Tensor cuda_kv_cache_scales(const Tensor& kv_cache) {
  QUILT_REQUIRE(kv_cache.device() == Device::cuda && kv_cache.dtype() == DType::fp8_e4m3 && kv_cache.rank() == 3,
                "cuda_kv_cache_scales: ", kv_cache.describe(), " is not an fp8 KV cache of the cuda backend");
  return Tensor(nullptr, cuda::kv_fp8_scales(kv_cache), DType::f32, Device::cuda, {kv_cache.dim(1), kv_cache.dim(0)});
}

void cuda_set_kernel_options(Backend& backend, const CudaKernelOptions& o) {
  cuda::Context& c = as_cuda(backend).context();
  c.grouped_attention = o.grouped_attention;
  c.gemv_max_rows = o.gemv_max_rows;
  c.gemv_autotune = o.gemv_autotune;
  c.gemv_kernel = o.gemv_kernel;
  c.prefill_min_rows = o.prefill_min_rows;
  c.lora_overlap = o.lora_overlap;
}

}  // namespace quilt
