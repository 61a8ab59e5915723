#pragma once
// The op set shared by every backend. One op has one name here, in cpu/<op>.cpp and in
// cuda/<op>.cu. Destination first; shapes are given in the comment of each argument.
// Ops never allocate and never exit: a shape mismatch is our bug (QUILT_ASSERT).
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "quilt/kernels/lora_plan.h"
#include "quilt/kernels/sample.h"
#include "quilt/kernels/tensor.h"

namespace quilt {

struct RopeParams {
  int num_q_heads = 0;   // heads of q in the fused qkv row (this rank's)
  int num_kv_heads = 0;  // heads of k (and v) in the fused qkv row (this rank's)
  int head_dim = 0;
  float theta = 10000.f;
};

struct KvWriteParams {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
};

struct AttentionParams {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  int max_blocks_per_seq = 0;  // row stride of block_tables
  float scale = 1.f;           // softmax scale, head_dim^-0.5 for Gemma
  // Optional host copies of cu_seqlens [num_seqs + 1] and seqlens [num_seqs] (the same values as
  // the device tensors), valid during the call: with them a backend may plan its launches on the
  // host (the CUDA backend's prefill kernel). Null: the backend reads the device tensors only.
  const int32_t* host_cu_seqlens = nullptr;
  const int32_t* host_seqlens = nullptr;
  int num_seqs = 0;
};

// One adapter's rows in a LoRA op: rows [row_begin, row_end) of x and y use factors A and B.
struct LoraSegment {
  int32_t row_begin = 0, row_end = 0;
  const Tensor* A = nullptr;  // [r, K]
  const Tensor* B = nullptr;  // [N, r], the scale folded in
};
// One module's LoRA in a grouped call: its segments, writing columns [col_offset, col_offset + N).
struct LoraProblem {
  std::vector<LoraSegment> segments;
  int64_t col_offset = 0;
};

// A recorded sequence of ops that replays with one launch (a CUDA graph). Replays read and write
// the same tensors the recording did: refill their contents (upload_i32) before each launch.
class BackendGraph {
 public:
  virtual ~BackendGraph() = default;
  virtual void launch() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual Device device() const = 0;
  // The dtype of activations and weights kept by this backend (f32 on the CPU).
  virtual DType compute_dtype() const = 0;

  // ---- memory ------------------------------------------------------------------------------
  virtual Tensor empty(const std::vector<int64_t>& shape, DType dtype) = 0;
  virtual Tensor zeros(const std::vector<int64_t>& shape, DType dtype) = 0;
  // Copies host data stored as `src_dtype` (f32, f16 or bf16) into a new tensor of
  // compute_dtype(), converting on the way.
  virtual Tensor from_host(const void* src, DType src_dtype, const std::vector<int64_t>& shape) = 0;
  virtual Tensor from_host_i32(const int32_t* src, const std::vector<int64_t>& shape) = 0;
  // dst: host floats, src.numel() of them.
  virtual void to_host_f32(float* dst, const Tensor& src) = 0;
  virtual void copy(Tensor& dst, const Tensor& src) = 0;

  // ---- ops ---------------------------------------------------------------------------------
  // out[T, H] = table[ids[t] - vocab_start] * scale, or 0 when ids[t] is outside this shard
  // (vocab-parallel embedding; the caller all-reduces). A backend whose compute_dtype() is
  // narrower than f32 rounds `scale` to that dtype first, as the reference model does.
  virtual void embedding(Tensor& out,          // [T, H]
                         const Tensor& table,  // [V_local, H]
                         const Tensor& ids,    // [T] i32
                         int64_t vocab_start, float scale) = 0;

  // out = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32.
  virtual void rms_norm(Tensor& out,      // [T, H]
                        const Tensor& x,  // [T, H]
                        const Tensor& w,  // [H]
                        float eps) = 0;

  // residual += x; out = rms_norm(residual).
  virtual void add_rms_norm(Tensor& residual,  // [T, H], updated in place
                            Tensor& out,       // [T, H]
                            const Tensor& x,   // [T, H]
                            const Tensor& w,   // [H]
                            float eps) = 0;

  // y = x W^T (+ y when accumulate).
  virtual void matmul(Tensor& y,        // [M, N]
                      const Tensor& x,  // [M, K]
                      const Tensor& w,  // [N, K]
                      bool accumulate) = 0;

  // Rotate-half RoPE applied in place to the q and k parts of the fused qkv rows.
  virtual void rope(Tensor& qkv,               // [T, (Hq + 2 Hkv) * D]
                    const Tensor& positions,   // [T] i32
                    const RopeParams& p) = 0;

  // Scatters the k and v parts of qkv into the paged cache at `slots` (slot < 0: skip).
  virtual void write_kv_cache(Tensor& k_cache,        // backend layout, num_blocks * block_size slots
                              Tensor& v_cache,        // same
                              const Tensor& qkv,      // [T, (Hq + 2 Hkv) * D]
                              const Tensor& slots,    // [T] i32
                              const KvWriteParams& p) = 0;

  // Causal attention over the paged cache for a batch of sequences. Sequence s owns query rows
  // [cu_seqlens[s], cu_seqlens[s+1]); they are the last q_len tokens of its seqlens[s]-long
  // context, so prefill (q_len = prompt), decode (q_len = 1) and chunks share one path.
  virtual void paged_attention(Tensor& out,                 // [T, Hq * D]
                               const Tensor& qkv,           // [T, (Hq + 2 Hkv) * D]
                               const Tensor& k_cache,
                               const Tensor& v_cache,
                               const Tensor& cu_seqlens,    // [S + 1] i32
                               const Tensor& seqlens,       // [S] i32
                               const Tensor& block_tables,  // [S, max_blocks_per_seq] i32
                               const AttentionParams& p) = 0;

  // out = gelu_tanh(gate) * up, with gate_up = [gate | up] per row.
  virtual void gelu_tanh_mul(Tensor& out,             // [T, I]
                             const Tensor& gate_up) = 0;  // [T, 2 I]

  // out[m] = x[indices[m]].
  virtual void gather_rows(Tensor& out,             // [M, H]
                           const Tensor& x,         // [T, H]
                           const Tensor& indices) = 0;  // [M] i32

  // Multi-LoRA (SGMV): for each segment, y[rows, col_offset : col_offset + N] += (x[rows] A^T) B^T
  // with an fp32 intermediate. Rows in no segment (the base model's) are untouched. A backend
  // without a LoRA kernel refuses with a clear error.
  virtual void lora_sgmv(Tensor& y,                                // [T, >= col_offset + N]
                         const Tensor& x,                          // [T, K]
                         const std::vector<LoraSegment>& segments,
                         int64_t col_offset);
  // Several lora_sgmv problems on the same x and y (q, k and v into the fused qkv; gate and up into
  // gate_up), in one call; the problems must write disjoint column ranges. The default runs
  // lora_sgmv once per problem; the CUDA backend does all of them in one shrink and one expand.
  virtual void lora_sgmv_multi(Tensor& y,        // [T, >= every col_offset + N]
                               const Tensor& x,  // [T, K]
                               const std::vector<LoraProblem>& problems);
  // Multi-LoRA of a whole step from a plan in backend memory (lora_plan.h): no host work or upload
  // per call, launches sized by step.max_tiles only (graph-safe). lora_shrink computes, for every
  // tile and module of the group, v = x[rows] A^T (fp32) into step.partials; lora_expand adds
  // v B^T into y[rows, col : col + n] with one rounding. Rows in no tile are untouched. A group's
  // shrink and expand come in pairs, with no other LoRA call between them; other ops may (the
  // base matmul writing y: the cuda backend runs the shrink beside it on a second stream).
  virtual void lora_shrink(const LoraStep& step, int layer, const LoraGroup& group,
                           const Tensor& x);  // [T, group.k]
  virtual void lora_expand(const LoraStep& step, int layer, const LoraGroup& group,
                           Tensor& y);        // [T, >= every col + n]
  // lora_expand into gate_up fused with gelu_tanh_mul (the consumer): out = gelu_tanh(gate + dg) *
  // (up + du) for every row (d = 0 in rows in no tile), gate + dg and up + du each rounded to the
  // storage dtype as lora_expand stores them; gate_up itself is left as it is. `group` is gate at
  // column 0 and up at column I. Launch sized by step.max_tiles and step.max_rows (every row of
  // the step must be a tile row or a listed base row: lora_tiles over all T rows).
  virtual void lora_expand_gelu(const LoraStep& step, int layer, const LoraGroup& group,
                                const Tensor& gate_up,  // [T, 2 I]
                                Tensor& out);           // [T, I]

  // Chooses a token for every batch row and computes every target's logprob (sample.h), from
  // logits that stay on this backend; only the small result comes back (the op waits for it).
  // Column v of a row lives in shard v / Vr at [v / Vr, row, v % Vr]; columns >= batch.vocab
  // (the last shard's padding) are ignored.
  virtual void sample(SampleResult& out,
                      const Tensor& logits,  // [M, Vr] or [P, M, Vr] (all-gathered shards), compute dtype
                      const SampleBatch& batch) = 0;

  // ---- graphs (decode steps replayed with one launch) ---------------------------------------
  // Whether capture_graph works on this backend (cuda: yes; cpu: no, and the model runs eagerly).
  virtual bool supports_graphs() const { return false; }
  // Records the ops that `body` enqueues, without running them. The body must not allocate,
  // synchronise or download, and each op in it must already have run once with the same shapes
  // (kernels that tune themselves on a shape's first call do it outside the recording).
  virtual std::unique_ptr<BackendGraph> capture_graph(const std::function<void()>& body);
  // Changes whenever a buffer that recorded graphs may point into (the ops' scratch) is
  // reallocated: graphs recorded before the change must be recorded again.
  virtual uint64_t graph_epoch() const { return 0; }
  // Copies n = dst.numel() host values into an existing i32 tensor, ordered with the ops (no
  // synchronisation on the cuda backend).
  virtual void upload_i32(Tensor& dst, const int32_t* src) = 0;
  // Device memory: bytes free and total (0, 0 on the cpu backend).
  virtual std::pair<size_t, size_t> memory_info() { return {0, 0}; }

  // KV cache storage for one layer: k and v, each num_blocks * block_size slots of
  // num_kv_heads * head_dim values, in the backend's own layout, stored as `dtype`: the compute
  // dtype, or DType::fp8_e4m3 on the cuda backend (e4m3 values with an fp32 scale per slot and
  // KV head, kernels/cuda/kv_fp8.cuh); a backend refuses a dtype it has no kernels for.
  // write_kv_cache and paged_attention take either.
  virtual Tensor kv_cache_tensor(int64_t num_blocks, int block_size, int num_kv_heads, int head_dim,
                                 DType dtype) = 0;
  Tensor kv_cache_tensor(int64_t num_blocks, int block_size, int num_kv_heads, int head_dim) {
    return kv_cache_tensor(num_blocks, block_size, num_kv_heads, head_dim, compute_dtype());
  }
  // Device bytes per token slot of one such tensor (fp8 includes its scales).
  virtual size_t kv_cache_bytes_per_slot(int num_kv_heads, int head_dim, DType dtype) const {
    return static_cast<size_t>(num_kv_heads) * head_dim * dtype_size(dtype);
  }
};

struct BackendOptions {
  // Storage dtype of weights, activations and the KV cache. Unset: the backend's default (cpu: f32,
  // the only one it has; cuda: bf16, with f32 for exactness checks and f16 as options).
  std::optional<DType> compute_dtype;
  int device = 0;  // GPU ordinal for the cuda backend (one GPU per process)
};

// Implemented in backend_factory.cpp, the one place that knows which backends were compiled.
std::unique_ptr<Backend> make_backend(const std::string& name, const BackendOptions& options = {});
std::vector<std::string> compiled_backends();

}  // namespace quilt
