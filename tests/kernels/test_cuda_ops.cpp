// Every CUDA op against the CPU backend (the fp32 reference) on random inputs, in each storage
// dtype of the CUDA backend. Runs on the GPU machine; without a visible GPU every test is
// skipped (GTEST_SKIP), never passed.
//
// Inputs are drawn in fp32 and rounded to the dtype under test on the host, so both backends
// see the same values; what is left is the GPU's own rounding. Tolerance, per element:
//   |gpu - cpu| <= tol * max(|cpu|, rms(cpu))
// (relative to the element, or to the tensor's RMS where the element is small through
// cancellation, as in sums and rotations), with
//   f32  tol = 1e-5: summation order and 1-ulp differences of tanh/exp/sin/cos/sqrt (measured
//        on an H100: <= 5.3e-6, attention and matmul; <= 4e-7 elsewhere);
//   bf16 tol = 1e-2: 8-bit significand, unit roundoff u = 2^-8 = 0.39% per rounding. Most ops
//        round once (measured 0.389%); add_rms_norm's output rounds twice (it normalises the
//        rounded residual, as the reference model does) and so does cuBLAS's beta = 1 epilogue,
//        a hard bound of 2u = 0.78% (measured 0.75% and 0.65%);
//   f16  tol = 2e-3: 11-bit significand, u = 2^-11 = 0.049%, 2u = 0.098% (measured 0.096%),
//        2x headroom.
// Copies (embedding rows, gather, KV writes) must match exactly after rounding the CPU's
// output to the dtype.
#include <gtest/gtest.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

using namespace quilt;

namespace {

float round_to(DType dt, float v) {
  switch (dt) {
    case DType::bf16: return bf16_to_f32(f32_to_bf16(v));
    case DType::f16: return __half2float(__float2half_rn(v));
    default: return v;
  }
}

double tolerance(DType dt) {
  switch (dt) {
    case DType::f32: return 1e-5;
    case DType::bf16: return 1e-2;
    case DType::f16: return 2e-3;
    default: return 0;
  }
}

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the CUDA ops were not run";
    dt = GetParam();
    cpu = make_backend("cpu");
    gpu = make_backend("cuda", BackendOptions{dt});
  }

  std::vector<float> randn(size_t n, float stddev = 1.0f) {
    std::normal_distribution<float> N(0.0f, stddev);
    std::vector<float> v(n);
    for (float& x : v) x = round_to(dt, N(rng));
    return v;
  }
  std::vector<float> host(Backend& b, const Tensor& t) {
    std::vector<float> v(t.numel());
    b.to_host_f32(v.data(), t);
    return v;
  }
  Tensor up(Backend& b, const std::vector<float>& v, std::vector<int64_t> shape) {
    return b.from_host(v.data(), DType::f32, shape);
  }
  Tensor ids(Backend& b, const std::vector<int32_t>& v, std::vector<int64_t> shape = {}) {
    if (shape.empty()) shape = {static_cast<int64_t>(v.size())};
    return b.from_host_i32(v.data(), shape);
  }

  // Checks the tolerance above and prints the worst scaled difference for the report.
  void expect_close(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want, double tol = -1) {
    if (tol < 0) tol = tolerance(dt);
    ASSERT_EQ(got.size(), want.size()) << what;
    double ss = 0;
    for (float w : want) ss += static_cast<double>(w) * w;
    const double rms = want.empty() ? 0 : std::sqrt(ss / want.size());
    double worst = 0;
    size_t at = 0, bad = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      const double ref = std::max<double>(std::abs(want[k]), rms);
      const double d = std::abs(static_cast<double>(got[k]) - want[k]);
      const double scaled = ref > 0 ? d / ref : d;
      if (!(scaled <= tol)) ++bad;  // NaN counts as bad
      if (!(scaled <= worst)) {
        worst = scaled;
        at = k;
      }
    }
    std::printf("[cuda-ops] %-5s %-52s max |gpu-cpu|/max(|cpu|,rms) = %.3g (tol %.0e)\n",
                dtype_name(dt), what.c_str(), worst, tol);
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off; worst at " << at
                       << ": gpu " << got[at] << " cpu " << want[at] << " (rms " << rms << ")";
  }
  void expect_exact(const std::string& what, const std::vector<float>& got, std::vector<float> want) {
    for (float& w : want) w = round_to(dt, w);
    expect_close(what + " [exact]", got, want, 0.0);
  }

  DType dt = DType::f32;
  std::unique_ptr<Backend> cpu, gpu;
  std::mt19937 rng{20261127};
};

std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return dtype_name(info.param); }

}  // namespace

TEST_P(CudaOps, MemoryRoundTripCopyAndZeros) {
  const std::vector<float> v = randn(1000);
  Tensor t = up(*gpu, v, {10, 100});
  EXPECT_EQ(t.dtype(), dt);
  EXPECT_EQ(t.device(), Device::cuda);
  expect_exact("from_host f32 -> to_host_f32", host(*gpu, t), v);
  // bf16 and f16 sources convert on the host.
  std::vector<uint16_t> b16(v.size());
  for (size_t k = 0; k < v.size(); ++k) b16[k] = f32_to_bf16(v[k]);
  std::vector<float> want(v.size());
  for (size_t k = 0; k < v.size(); ++k) want[k] = bf16_to_f32(b16[k]);
  expect_exact("from_host bf16", host(*gpu, gpu->from_host(b16.data(), DType::bf16, {1000})), want);
  Tensor c = gpu->empty({10, 100}, dt);
  gpu->copy(c, t);
  expect_exact("copy", host(*gpu, c), v);
  expect_exact("zeros", host(*gpu, gpu->zeros({7, 3}, dt)), std::vector<float>(21, 0.f));
  EXPECT_EQ(gpu->kv_cache_tensor(3, 16, 2, 64).numel(), 3 * 16 * 2 * 64);
  // i32 uploads go through pinned staging without a synchronisation each: many uploads in a row
  // (past the staging's 4 MiB, which makes it wait and start over) and one bigger than it (which
  // grows it) must all arrive intact.
  {
    std::vector<std::vector<int32_t>> srcs;
    std::vector<Tensor> ups;
    for (int k = 0; k < 1100; ++k) {
      srcs.emplace_back(1000 + k % 7);
      std::iota(srcs.back().begin(), srcs.back().end(), k * 3);
      ups.push_back(gpu->from_host_i32(srcs.back().data(), {static_cast<int64_t>(srcs.back().size())}));
      if (k == 500) {
        std::vector<int32_t> big(3 << 20);
        std::iota(big.begin(), big.end(), -7);
        srcs.push_back(big);
        ups.push_back(gpu->from_host_i32(srcs.back().data(), {static_cast<int64_t>(big.size())}));
      }
    }
    size_t bad = 0;
    for (size_t k = 0; k < ups.size(); ++k) {
      // to_host_f32 copies f32 bits unchanged: read the i32 data through an f32 alias.
      const Tensor alias(nullptr, ups[k].data(), DType::f32, Device::cuda, ups[k].shape());
      std::vector<float> bits(srcs[k].size());
      gpu->to_host_f32(bits.data(), alias);
      bad += std::memcmp(bits.data(), srcs[k].data(), bits.size() * sizeof(int32_t)) != 0;
    }
    EXPECT_EQ(bad, 0u) << "of " << ups.size() << " staged uploads";
  }
  // An impossible allocation is a clear, recoverable error, and the backend keeps working.
  EXPECT_THROW(gpu->empty({int64_t{1} << 45}, dt), quilt::Error);
  expect_exact("copy after a failed allocation", host(*gpu, c), v);
}

TEST_P(CudaOps, EmbeddingScalesMasksForeignIdsAndRoundsTheScale) {
  struct Case { int64_t T, H, V, vocab_start; };
  for (const Case& c : {Case{1, 2048, 1000, 0}, Case{7, 200, 97, 50}, Case{300, 3072, 517, 1000},
                        Case{33, 64, 50, 0}, Case{5, 13, 11, 3}}) {
    const std::vector<float> table = randn(c.V * c.H, 0.35f);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_start + c.V + 40));
    std::vector<int32_t> tok(c.T);
    for (auto& x : tok) x = id(rng);
    tok[0] = static_cast<int32_t>(c.vocab_start);  // first row of the shard
    const float scale = std::sqrt(static_cast<float>(c.H));
    Tensor o1 = cpu->empty({c.T, c.H}, DType::f32), o2 = gpu->empty({c.T, c.H}, dt);
    // The CUDA backend rounds the scale to its dtype first (HF multiplies by a bf16 normaliser).
    cpu->embedding(o1, up(*cpu, table, {c.V, c.H}), ids(*cpu, tok), c.vocab_start, round_to(dt, scale));
    gpu->embedding(o2, up(*gpu, table, {c.V, c.H}), ids(*gpu, tok), c.vocab_start, scale);
    expect_exact("embedding T=" + std::to_string(c.T) + " H=" + std::to_string(c.H), host(*gpu, o2), host(*cpu, o1));
  }
}

TEST_P(CudaOps, RmsNormAndAddRmsNorm) {
  struct Case { int64_t T, H; };
  for (const Case& c : {Case{1, 2048}, Case{5, 200}, Case{300, 3072}, Case{17, 48}, Case{3, 7}}) {
    const std::string tag = " T=" + std::to_string(c.T) + " H=" + std::to_string(c.H);
    const auto x = randn(c.T * c.H, 3.0f), r = randn(c.T * c.H, 3.0f), w = randn(c.H, 0.5f);
    Tensor o1 = cpu->empty({c.T, c.H}, DType::f32), o2 = gpu->empty({c.T, c.H}, dt);
    cpu->rms_norm(o1, up(*cpu, x, {c.T, c.H}), up(*cpu, w, {c.H}), 1e-6f);
    gpu->rms_norm(o2, up(*gpu, x, {c.T, c.H}), up(*gpu, w, {c.H}), 1e-6f);
    expect_close("rms_norm" + tag, host(*gpu, o2), host(*cpu, o1));

    Tensor r1 = up(*cpu, r, {c.T, c.H}), r2 = up(*gpu, r, {c.T, c.H});
    cpu->add_rms_norm(r1, o1, up(*cpu, x, {c.T, c.H}), up(*cpu, w, {c.H}), 1e-6f);
    gpu->add_rms_norm(r2, o2, up(*gpu, x, {c.T, c.H}), up(*gpu, w, {c.H}), 1e-6f);
    expect_close("add_rms_norm residual" + tag, host(*gpu, r2), host(*cpu, r1));
    expect_close("add_rms_norm out" + tag, host(*gpu, o2), host(*cpu, o1));
  }
}

TEST_P(CudaOps, Matmul) {
  struct Case { int64_t M, N, K; bool acc, offset; };
  for (const Case& c : {Case{1, 2304, 2048, false, false}, Case{7, 256, 2048, true, false},
                        Case{300, 513, 67, false, true}, Case{33, 1000, 16384, true, false},
                        Case{129, 4097, 255, false, true}, Case{2, 3, 1, true, true},
                        // M <= 8 with K % 8 == 0 and aligned x take the GEMV in bf16/f16
                        Case{3, 2560, 2048, false, false}, Case{8, 1000, 16384, true, false},
                        Case{5, 77, 264, false, true}, Case{1, 13, 8, true, false}, Case{4, 4100, 3072, false, false},
                        // decode shapes (2b down, 7b down) and many tiles per block of the persistent GEMV
                        Case{8, 2048, 16384, false, false}, Case{1, 3072, 24576, true, false},
                        Case{2, 40000, 256, false, false}, Case{3, 33333, 136, true, true}}) {
    const std::string tag = " M=" + std::to_string(c.M) + " N=" + std::to_string(c.N) + " K=" +
                            std::to_string(c.K) + (c.acc ? " +=" : "") + (c.offset ? " x at row 1" : "");
    // With `offset` x is rows [1, M+1) of a bigger tensor: a pointer that is not 16-byte aligned
    // when K is odd.
    const int64_t rows = c.M + (c.offset ? 1 : 0);
    const auto x = randn(rows * c.K), w = randn(c.N * c.K, 1.0f / std::sqrt(static_cast<float>(c.K)));
    const auto y0 = randn(c.M * c.N);
    Tensor x1 = up(*cpu, x, {rows, c.K}).slice_rows(rows - c.M, rows);
    Tensor x2 = up(*gpu, x, {rows, c.K}).slice_rows(rows - c.M, rows);
    Tensor y1 = up(*cpu, y0, {c.M, c.N}), y2 = up(*gpu, y0, {c.M, c.N});
    cpu->matmul(y1, x1, up(*cpu, w, {c.N, c.K}), c.acc);
    gpu->matmul(y2, x2, up(*gpu, w, {c.N, c.K}), c.acc);
    const auto want = host(*cpu, y1);
    expect_close("matmul" + tag, host(*gpu, y2), want);
    // Every GEMV kernel (matmul.cu) for every M it has, whether or not the tuning picks it here
    // (bf16/f16 with aligned x; otherwise these runs take cuBLAS again).
    for (int k = 0; c.M <= 8 && k < cuda_gemv_kernel_count(); ++k) {
      CudaKernelOptions o;
      o.gemv_kernel = k;
      cuda_set_kernel_options(*gpu, o);
      Tensor y3 = up(*gpu, y0, {c.M, c.N});
      gpu->matmul(y3, x2, up(*gpu, w, {c.N, c.K}), c.acc);
      cuda_set_kernel_options(*gpu, CudaKernelOptions{});
      expect_close("matmul gemv '" + cuda_gemv_kernel_name(k) + "'" + tag, host(*gpu, y3), want);
    }
  }
}

// A decode layer's chain of norms, GEMVs, rope and GeGLU issued back to back (with PDL each
// kernel may start before the previous one ends, kernels/cuda/pdl.cuh) must give bitwise the
// same results as the same ops with a device synchronisation after each one, eagerly and when
// replayed from a CUDA graph (whose first kernel follows a copy). Every kernel is deterministic,
// so any difference is an ordering bug. Each GEMV kernel in turn, batch 1 and 8.
TEST_P(CudaOps, DecodeChainBackToBackMatchesSynchronisedOps) {
  const int64_t H = 2048, I = 2048, D = 256;
  const int Hq = 8, Hkv = 1;
  const int64_t QKV = (Hq + 2 * Hkv) * D;
  const RopeParams rp{Hq, Hkv, static_cast<int>(D), 10000.f};
  for (int64_t T : {int64_t{1}, int64_t{8}}) {
    Tensor x0 = up(*gpu, randn(T * H, 2.0f), {T, H}), res0 = up(*gpu, randn(T * H, 2.0f), {T, H});
    Tensor wn1 = up(*gpu, randn(H, 0.5f), {H}), wn2 = up(*gpu, randn(H, 0.5f), {H}), wn3 = up(*gpu, randn(H, 0.5f), {H});
    Tensor wqkv = up(*gpu, randn(QKV * H, 0.03f), {QKV, H}), wo = up(*gpu, randn(H * QKV, 0.03f), {H, QKV});
    Tensor wgu = up(*gpu, randn(2 * I * H, 0.03f), {2 * I, H}), wd = up(*gpu, randn(H * I, 0.03f), {H, I});
    std::vector<int32_t> p(T);
    for (int64_t t = 0; t < T; ++t) p[t] = static_cast<int32_t>(100 + 37 * t);
    Tensor pos = ids(*gpu, p);
    Tensor res = gpu->empty({T, H}, dt), normed = gpu->empty({T, H}, dt), qkv = gpu->empty({T, QKV}, dt);
    Tensor proj = gpu->empty({T, H}, dt), gu = gpu->empty({T, 2 * I}, dt), act = gpu->empty({T, I}, dt);
    auto chain = [&](bool sync) {
      auto step = [&] {
        if (sync) cuda_synchronize(*gpu);
      };
      gpu->copy(res, res0);
      step();
      gpu->rms_norm(normed, x0, wn1, 1e-6f);
      step();
      gpu->matmul(qkv, normed, wqkv, false);
      step();
      gpu->rope(qkv, pos, rp);
      step();
      gpu->matmul(proj, qkv, wo, false);
      step();
      gpu->add_rms_norm(res, normed, proj, wn2, 1e-6f);
      step();
      gpu->matmul(gu, normed, wgu, false);
      step();
      gpu->gelu_tanh_mul(act, gu);
      step();
      gpu->matmul(proj, act, wd, true);
      step();
      gpu->add_rms_norm(res, normed, proj, wn3, 1e-6f);
    };
    for (int k = 0; k < cuda_gemv_kernel_count(); ++k) {
      CudaKernelOptions o;
      o.gemv_kernel = k;
      cuda_set_kernel_options(*gpu, o);
      const std::string what = " T=" + std::to_string(T) + " gemv '" + cuda_gemv_kernel_name(k) + "'";
      chain(true);
      const auto want_res = host(*gpu, res), want_norm = host(*gpu, normed), want_qkv = host(*gpu, qkv);
      size_t off = 0;
      for (int rep = 0; rep < 10; ++rep) {
        chain(false);
        const auto r = host(*gpu, res), n = host(*gpu, normed), q = host(*gpu, qkv);
        for (size_t i = 0; i < r.size(); ++i) off += r[i] != want_res[i] || n[i] != want_norm[i];
        for (size_t i = 0; i < q.size(); ++i) off += q[i] != want_qkv[i];
      }
      EXPECT_EQ(off, 0u) << "back to back" << what << ": elements differ from the synchronised ops";
      if (gpu->supports_graphs()) {
        auto graph = gpu->capture_graph([&] { chain(false); });
        size_t goff = 0;
        for (int rep = 0; rep < 10; ++rep) {
          graph->launch();
          const auto r = host(*gpu, res), n = host(*gpu, normed), q = host(*gpu, qkv);
          for (size_t i = 0; i < r.size(); ++i) goff += r[i] != want_res[i] || n[i] != want_norm[i];
          for (size_t i = 0; i < q.size(); ++i) goff += q[i] != want_qkv[i];
        }
        EXPECT_EQ(goff, 0u) << "graph replay" << what << ": elements differ from the synchronised ops";
        std::printf("[cuda-ops] %-5s decode chain%s: back to back %zu, graph %zu elements off (of %zu x 10)\n",
                    dtype_name(dt), what.c_str(), off, goff, 2 * want_res.size() + want_qkv.size());
      }
    }
    cuda_set_kernel_options(*gpu, CudaKernelOptions{});
  }
}

TEST_P(CudaOps, Rope) {
  struct Case { int Hq, Hkv, D; int64_t T; };
  for (const Case& c : {Case{8, 1, 256, 1}, Case{8, 2, 128, 37}, Case{4, 4, 64, 300},
                        Case{16, 16, 256, 5}, Case{3, 1, 6, 9}}) {
    const std::string tag = " " + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " heads D=" +
                            std::to_string(c.D) + " T=" + std::to_string(c.T);
    const int64_t row = static_cast<int64_t>(c.Hq + 2 * c.Hkv) * c.D;
    const auto qkv = randn(c.T * row);
    std::uniform_int_distribution<int32_t> P(0, 8191);
    std::vector<int32_t> pos(c.T);
    for (auto& p : pos) p = P(rng);  // out of order, up to 8k
    pos[0] = 0;
    const RopeParams rp{c.Hq, c.Hkv, c.D, 10000.f};
    Tensor a = up(*cpu, qkv, {c.T, row}), b = up(*gpu, qkv, {c.T, row});
    cpu->rope(a, ids(*cpu, pos), rp);
    gpu->rope(b, ids(*gpu, pos), rp);
    const auto got = host(*gpu, b), want = host(*cpu, a);
    expect_close("rope" + tag, got, want);
    // v is untouched
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t k = static_cast<int64_t>(c.Hq + c.Hkv) * c.D; k < row; ++k)
        ASSERT_EQ(got[t * row + k], qkv[t * row + k]) << "v changed at token " << t;
  }
}

TEST_P(CudaOps, WriteKvCacheSkipsPaddingAndScatters) {
  struct Case { int Hq, Hkv, D; int64_t T; int blocks, bs; };
  for (const Case& c : {Case{8, 1, 256, 50, 8, 16}, Case{8, 2, 128, 33, 5, 16}, Case{3, 1, 6, 20, 3, 8}}) {
    const std::string tag = " " + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " heads D=" +
                            std::to_string(c.D) + " T=" + std::to_string(c.T);
    const int64_t row = static_cast<int64_t>(c.Hq + 2 * c.Hkv) * c.D;
    const auto qkv = randn(c.T * row);
    std::vector<int32_t> slots(c.blocks * c.bs);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    slots.resize(c.T);
    for (int64_t t = 0; t < c.T; t += 7) slots[t] = -1;  // padding rows
    const KvWriteParams kp{c.Hq, c.Hkv, c.D, c.bs};
    Tensor k1 = cpu->kv_cache_tensor(c.blocks, c.bs, c.Hkv, c.D), v1 = cpu->kv_cache_tensor(c.blocks, c.bs, c.Hkv, c.D);
    Tensor k2 = gpu->kv_cache_tensor(c.blocks, c.bs, c.Hkv, c.D), v2 = gpu->kv_cache_tensor(c.blocks, c.bs, c.Hkv, c.D);
    cpu->write_kv_cache(k1, v1, up(*cpu, qkv, {c.T, row}), ids(*cpu, slots), kp);
    gpu->write_kv_cache(k2, v2, up(*gpu, qkv, {c.T, row}), ids(*gpu, slots), kp);
    // Same layout on both backends ([slots, Hkv, D]); a new GPU layout needs a reader here.
    expect_exact("write_kv_cache k" + tag, host(*gpu, k2), host(*cpu, k1));
    expect_exact("write_kv_cache v" + tag, host(*gpu, v2), host(*cpu, v1));
  }
}

// Several sequences in one batch: decode over ~4k tokens, a chunk at the end of a 4k context,
// whole prompts (prefill), tiny contexts and a sequence with no new rows, over blocks handed
// out in random order. The cache is filled through write_kv_cache on each backend.
TEST_P(CudaOps, PagedAttentionPrefillChunksDecodeLongContexts) {
  struct Seq { int ctx, q_len; };
  struct Case { int Hq, Hkv, D; float q_std; std::vector<Seq> seqs; };
  const std::vector<Seq> long_mix = {{4100, 1}, {4096, 37}, {300, 300}, {17, 1}, {1, 1}, {5, 0}, {33, 16}};
  const std::vector<Seq> short_mix = {{1024, 1}, {200, 200}, {700, 64}, {1, 1}, {16, 16}};
  // Decode only: few rows, so the grouped kernel splits the context (split-K), with contexts that
  // end inside a chunk, a chunk-sized one, and one of a single key; up to 32 chunks the last
  // block merges (decode_short, 16/16, 8/2), beyond that merge_kernel (decode_mix, decode_one).
  const std::vector<Seq> decode_mix = {{4100, 1}, {2048, 1}, {17, 1}, {1, 1}, {5, 0}, {33, 1}, {512, 1}};
  const std::vector<Seq> decode_one = {{8191, 1}};
  const std::vector<Seq> decode_short = {{300, 1}, {200, 1}, {37, 1}, {1, 1}};
  for (const Case& c : {Case{8, 1, 256, 1.0f, long_mix}, Case{8, 2, 128, 2.0f, long_mix},
                        Case{4, 4, 64, 4.0f, long_mix}, Case{16, 16, 256, 1.0f, short_mix},
                        Case{6, 2, 10, 2.0f, short_mix}, Case{8, 1, 256, 1.0f, decode_mix},
                        Case{8, 1, 256, 3.0f, decode_one}, Case{16, 16, 256, 1.0f, decode_mix},
                        Case{8, 2, 128, 2.0f, decode_mix}, Case{4, 4, 64, 4.0f, decode_one},
                        Case{32, 1, 64, 2.0f, decode_mix}, Case{8, 1, 256, 2.0f, decode_short}}) {
    const int bs = 16;
    const int64_t D = c.D, row = static_cast<int64_t>(c.Hq + 2 * c.Hkv) * D;
    const std::string tag = " " + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " heads D=" + std::to_string(c.D);
    const int S = static_cast<int>(c.seqs.size());
    int max_blocks = 0, total_blocks = 0;
    for (const Seq& s : c.seqs) {
      max_blocks = std::max(max_blocks, (s.ctx + bs - 1) / bs);
      total_blocks += (s.ctx + bs - 1) / bs;
    }
    const int num_blocks = total_blocks + 3;
    std::vector<int32_t> free(num_blocks);
    std::iota(free.begin(), free.end(), 0);
    std::shuffle(free.begin(), free.end(), rng);
    std::vector<int32_t> tables(static_cast<size_t>(S) * max_blocks, 0), cu{0}, lens;
    std::vector<int32_t> ctx_slots;
    for (int s = 0; s < S; ++s) {
      const int nb = (c.seqs[s].ctx + bs - 1) / bs;
      for (int b = 0; b < nb; ++b) {
        tables[s * max_blocks + b] = free.back();
        free.pop_back();
      }
      for (int j = 0; j < c.seqs[s].ctx; ++j) ctx_slots.push_back(tables[s * max_blocks + j / bs] * bs + j % bs);
      cu.push_back(cu.back() + c.seqs[s].q_len);
      lens.push_back(c.seqs[s].ctx);
    }
    // K and V of every context token, through the fused-row write.
    const int64_t n_ctx = static_cast<int64_t>(ctx_slots.size());
    const auto ctx_rows = randn(n_ctx * row);
    Tensor k1 = cpu->kv_cache_tensor(num_blocks, bs, c.Hkv, c.D), v1 = cpu->kv_cache_tensor(num_blocks, bs, c.Hkv, c.D);
    Tensor k2 = gpu->kv_cache_tensor(num_blocks, bs, c.Hkv, c.D), v2 = gpu->kv_cache_tensor(num_blocks, bs, c.Hkv, c.D);
    const KvWriteParams kp{c.Hq, c.Hkv, c.D, bs};
    cpu->write_kv_cache(k1, v1, up(*cpu, ctx_rows, {n_ctx, row}), ids(*cpu, ctx_slots), kp);
    gpu->write_kv_cache(k2, v2, up(*gpu, ctx_rows, {n_ctx, row}), ids(*gpu, ctx_slots), kp);

    const int64_t T = cu.back();
    const auto q = randn(T * row, c.q_std);
    const AttentionParams ap{c.Hq, c.Hkv, c.D, bs, max_blocks, static_cast<float>(1.0 / std::sqrt(double(D)))};
    Tensor o1 = cpu->empty({T, c.Hq * D}, DType::f32), o2 = gpu->empty({T, c.Hq * D}, dt);
    cpu->paged_attention(o1, up(*cpu, q, {T, row}), k1, v1, ids(*cpu, cu), ids(*cpu, lens),
                         ids(*cpu, tables, {S, max_blocks}), ap);
    gpu->paged_attention(o2, up(*gpu, q, {T, row}), k2, v2, ids(*gpu, cu), ids(*gpu, lens),
                         ids(*gpu, tables, {S, max_blocks}), ap);
    const std::string what = tag + " T=" + std::to_string(T) + " S=" + std::to_string(S);
    const auto want = host(*cpu, o1);
    // f32: the grouped kernel sums q.k as 8-element lane parts joined by a tree, the CPU left to
    // right; with q_std 4 (scores spread over +-12, dot partial sums ~60, 1 ulp ~ 4e-6) the scores
    // differ by ~1e-6 and the sharp softmax turns that into ~1e-5 of the output's RMS (measured
    // 1.24e-5 on an H100 at 4/4 heads D=64; the stage-1 kernel sums in the CPU's order: 5e-6).
    expect_close("paged_attention" + what, host(*gpu, o2), want, dt == DType::f32 ? 3e-5 : -1);
    // The stage-1 kernel (one block per q head), still used for shapes the grouped one does not take.
    cuda_set_kernel_options(*gpu, CudaKernelOptions{false, 8, true});
    Tensor o3 = gpu->empty({T, c.Hq * D}, dt);
    gpu->paged_attention(o3, up(*gpu, q, {T, row}), k2, v2, ids(*gpu, cu), ids(*gpu, lens),
                         ids(*gpu, tables, {S, max_blocks}), ap);
    cuda_set_kernel_options(*gpu, CudaKernelOptions{});
    expect_close("paged_attention stage-1" + what, host(*gpu, o3), want);
  }
}

TEST_P(CudaOps, GeluTanhMul) {
  struct Case { int64_t T, I; };
  for (const Case& c : {Case{1, 16384}, Case{300, 1000}, Case{7, 5}, Case{64, 24576}}) {
    const auto g = randn(c.T * 2 * c.I, 2.0f);
    Tensor o1 = cpu->empty({c.T, c.I}, DType::f32), o2 = gpu->empty({c.T, c.I}, dt);
    cpu->gelu_tanh_mul(o1, up(*cpu, g, {c.T, 2 * c.I}));
    gpu->gelu_tanh_mul(o2, up(*gpu, g, {c.T, 2 * c.I}));
    expect_close("gelu_tanh_mul T=" + std::to_string(c.T) + " I=" + std::to_string(c.I), host(*gpu, o2), host(*cpu, o1));
  }
}

TEST_P(CudaOps, GatherRows) {
  const auto x = randn(300 * 2048);
  const std::vector<int32_t> idx = {299, 0, 5, 5, 17, 298};
  Tensor o1 = cpu->empty({6, 2048}, DType::f32), o2 = gpu->empty({6, 2048}, dt);
  cpu->gather_rows(o1, up(*cpu, x, {300, 2048}), ids(*cpu, idx));
  gpu->gather_rows(o2, up(*gpu, x, {300, 2048}), ids(*gpu, idx));
  expect_exact("gather_rows", host(*gpu, o2), host(*cpu, o1));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         dtype_param_name);
