// The CUDA backend's tensor-core prefill path of paged_attention (kernels/cuda/prefill_attention.cu),
// taken when AttentionParams carries host copies of cu_seqlens and seqlens, against the CPU
// backend (the fp32 reference) and against the CUDA decode kernels (the path without host copies).
// Runs on the GPU machine; without a visible GPU every test is skipped (GTEST_SKIP), never passed.
//
// Every case is a varlen batch over a paged cache with shuffled (non-contiguous) block tables, the
// cache filled through write_kv_cache; sequences with q_len >= 16 (the default threshold) take the
// prefill kernel, the others (decode rows, short chunks) the grouped decode kernel through its row
// list, in the same call. Three rows past the last sequence hold a sentinel that must survive.
//
// Checks, per case:
//  1. every output row vs the same call without host copies (the decode kernels, fp32 math);
//  2. windows of rows vs the CPU (first 70, middle 70 and last 70 rows of each long sequence, all
//     rows of the others): a window [a, b) of a sequence whose q_len rows end a ctx-long context is
//     the CPU's attention for the last b - a rows of a (ctx - q_len + b)-long context, so the
//     reference costs O(window x context), not O(q_len x context);
//  3. the sentinel rows are bit-exact, and (bf16/f16) the prefill kernel really ran: its rows differ
//     from the decode kernels' in some bits (P is rounded before P.V there, not in the decode path).
//
// Error metric, per element: |gpu - ref| / max(|ref|, rms of ref over its (row, head)), the row's
// own RMS since long contexts average their values down (~1/sqrt(keys)). Tolerances:
//   f32 (no prefill kernel: the decode kernels, as without host copies): 3e-5, as test_cuda_ops.
//   bf16 3e-2 and f16 5e-3. The output is rounded once (u = 2^-8 = 0.39% for bf16, 2^-11 = 0.049%
//   for f16). As in FlashAttention, P = exp(s - m) is rounded to the MMA's 16-bit type before P.V
//   while l sums the fp32 P: each weight is off by a relative delta_j <= u, so the output is off by
//   sum_j p_j delta_j v_j / l, a sum of independent terms whose standard deviation is u / sqrt(3)
//   of the row's RMS whatever the number of keys (0.23% bf16, 0.028% f16). Over ~10^7 checked
//   elements the largest is ~5.6 sigma: 1.3% (bf16), 0.16% (f16). Rounding + P rounding, plus the
//   other side's rounding in check 1: <= 2.1% (bf16), 0.26% (f16), hence the tolerances (1.4x and
//   1.9x headroom). Q.K^T is exact products summed in fp32 (scores off by ~1e-6).
#include <gtest/gtest.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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
    case DType::f32: return 3e-5;
    case DType::bf16: return 3e-2;
    case DType::f16: return 5e-3;
    default: return 0;
  }
}

struct Seq {
  int ctx, q_len;
};
struct Case {
  std::string name;
  int Hq, Hkv, D, bs;
  float q_std;
  std::vector<Seq> seqs;
  // Block-table entries of sequence 0 pointed outside the cache (-1, and past the end): their keys
  // are masked by both GPU paths; the CPU refuses such tables, so only check 1 runs.
  bool bad_blocks = false;
};

constexpr int kExtraRows = 3;   // rows past the last sequence: untouched
constexpr float kSentinel = 3.0f;
constexpr int kWindow = 70;     // rows per CPU window

class CudaPrefill : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the CUDA prefill tests were not run";
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

  // Compares rows of [rows, Hq * D] outputs; where(r) names row r for the report.
  struct Worst {
    double err = 0;
    size_t bad = 0, n = 0;
    std::string at;
  };
  template <typename Where>
  Worst compare(const std::vector<float>& got, const std::vector<float>& want, int64_t rows, int Hq, int D,
                double tol, Where where) {
    Worst w;
    for (int64_t r = 0; r < rows; ++r)
      for (int h = 0; h < Hq; ++h) {
        const float* g = got.data() + (r * Hq + h) * D;
        const float* x = want.data() + (r * Hq + h) * D;
        double ss = 0;
        for (int d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
        const double rms = std::sqrt(ss / D);
        for (int d = 0; d < D; ++d) {
          const double ref = std::max<double>(std::abs(x[d]), rms);
          const double diff = std::abs(static_cast<double>(g[d]) - x[d]);
          const double e = ref > 0 ? diff / ref : diff;
          ++w.n;
          if (!(e <= tol)) ++w.bad;  // NaN counts as bad
          if (!(e <= w.err)) {
            w.err = e;
            char buf[160];
            std::snprintf(buf, sizeof buf, "%s head %d dim %d: gpu %.6g ref %.6g (row rms %.3g)", where(r).c_str(), h,
                          d, g[d], x[d], rms);
            w.at = buf;
          }
        }
      }
    return w;
  }

  void run(const Case& c) {
    const int bs = c.bs, D = c.D;
    const int64_t row = static_cast<int64_t>(c.Hq + 2 * c.Hkv) * D, out_w = static_cast<int64_t>(c.Hq) * D;
    const int S = static_cast<int>(c.seqs.size());
    int max_blocks = 1, total_blocks = 0;
    for (const Seq& s : c.seqs) {
      max_blocks = std::max(max_blocks, (s.ctx + bs - 1) / bs);
      total_blocks += (s.ctx + bs - 1) / bs;
    }
    const int num_blocks = total_blocks + 5;
    std::vector<int32_t> free(num_blocks);
    std::iota(free.begin(), free.end(), 0);
    std::shuffle(free.begin(), free.end(), rng);
    std::vector<int32_t> tables(static_cast<size_t>(S) * max_blocks, 0), cu{0}, lens, ctx_slots;
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
    if (c.bad_blocks) {
      tables[1] = -1;
      tables[3] = num_blocks + 7;
    }
    const int64_t n_ctx = static_cast<int64_t>(ctx_slots.size());
    const auto ctx_rows = randn(n_ctx * row);
    const KvWriteParams kp{c.Hq, c.Hkv, D, bs};
    Tensor k1 = cpu->kv_cache_tensor(num_blocks, bs, c.Hkv, D), v1 = cpu->kv_cache_tensor(num_blocks, bs, c.Hkv, D);
    Tensor k2 = gpu->kv_cache_tensor(num_blocks, bs, c.Hkv, D), v2 = gpu->kv_cache_tensor(num_blocks, bs, c.Hkv, D);
    cpu->write_kv_cache(k1, v1, up(*cpu, ctx_rows, {n_ctx, row}), ids(*cpu, ctx_slots), kp);
    gpu->write_kv_cache(k2, v2, up(*gpu, ctx_rows, {n_ctx, row}), ids(*gpu, ctx_slots), kp);

    const int64_t Tq = cu.back(), T = Tq + kExtraRows;
    const auto q = randn(T * row, c.q_std);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    AttentionParams ap{c.Hq, c.Hkv, D, bs, max_blocks, scale};
    const Tensor q2 = up(*gpu, q, {T, row}), cu2 = ids(*gpu, cu), lens2 = ids(*gpu, lens);
    const Tensor tables2 = ids(*gpu, tables, {S, max_blocks});

    // The decode kernels (no host copies), then the planned path into a sentinel-filled output.
    Tensor o_old = gpu->empty({T, out_w}, dt);
    gpu->paged_attention(o_old, q2, k2, v2, cu2, lens2, tables2, ap);
    Tensor o_new = up(*gpu, std::vector<float>(T * out_w, kSentinel), {T, out_w});
    ap.host_cu_seqlens = cu.data();
    ap.host_seqlens = lens.data();
    ap.num_seqs = S;
    gpu->paged_attention(o_new, q2, k2, v2, cu2, lens2, tables2, ap);
    const auto got = host(*gpu, o_new), old = host(*gpu, o_old);

    // CPU windows: one batch of "sequences", each the last rows [a, b) of a (ctx - q_len + b) context.
    struct Win {
      int s, a, b;
    };
    std::vector<Win> wins;
    for (int s = 0; s < S && !c.bad_blocks; ++s) {
      const int ql = c.seqs[s].q_len;
      if (ql == 0) continue;
      if (ql <= 3 * kWindow) {
        wins.push_back({s, 0, ql});
      } else {
        wins.push_back({s, 0, kWindow});
        wins.push_back({s, ql / 2 - kWindow / 2, ql / 2 + kWindow / 2});
        wins.push_back({s, ql - kWindow, ql});
      }
    }
    std::vector<int32_t> wcu{0}, wlens, wtables, wrow;  // wrow: the batch row of each window row
    for (const Win& w : wins) {
      wcu.push_back(wcu.back() + (w.b - w.a));
      wlens.push_back(c.seqs[w.s].ctx - c.seqs[w.s].q_len + w.b);
      wtables.insert(wtables.end(), tables.begin() + w.s * max_blocks, tables.begin() + (w.s + 1) * max_blocks);
      for (int i = w.a; i < w.b; ++i) wrow.push_back(cu[w.s] + i);
    }
    const int64_t WT = wcu.back(), WS = static_cast<int64_t>(wins.size());
    std::vector<float> wq(WT * row), want_w(WT * out_w), got_w(WT * out_w);
    for (int64_t i = 0; i < WT; ++i) {
      std::copy(q.begin() + wrow[i] * row, q.begin() + (wrow[i] + 1) * row, wq.begin() + i * row);
      std::copy(got.begin() + wrow[i] * out_w, got.begin() + (wrow[i] + 1) * out_w, got_w.begin() + i * out_w);
    }
    if (WS > 0) {
      const AttentionParams wap{c.Hq, c.Hkv, D, bs, max_blocks, scale};
      Tensor o_cpu = cpu->empty({WT, out_w}, DType::f32);
      cpu->paged_attention(o_cpu, up(*cpu, wq, {WT, row}), k1, v1, ids(*cpu, wcu), ids(*cpu, wlens),
                           ids(*cpu, wtables, {WS, max_blocks}), wap);
      want_w = host(*cpu, o_cpu);
    }

    auto seq_row = [&](int64_t t) {
      const int s = static_cast<int>(std::upper_bound(cu.begin(), cu.end(), static_cast<int32_t>(t)) - cu.begin()) - 1;
      return "seq " + std::to_string(s) + " (ctx " + std::to_string(c.seqs[s].ctx) + ", q_len " +
             std::to_string(c.seqs[s].q_len) + ") row " + std::to_string(t - cu[s]);
    };
    const double tol = tolerance(dt);
    const Worst vs_cpu = compare(got_w, want_w, WT, c.Hq, D, tol, [&](int64_t i) { return seq_row(wrow[i]); });
    const Worst vs_old = compare(got, old, Tq, c.Hq, D, tol, seq_row);
    size_t sentinel_bad = 0, differ = 0, prefill_elems = 0;
    for (int64_t i = Tq * out_w; i < T * out_w; ++i) sentinel_bad += got[i] != kSentinel;
    for (int s = 0; s < S; ++s)
      if (c.seqs[s].q_len >= 16)
        for (int64_t i = cu[s] * out_w; i < cu[s + 1] * out_w; ++i) {
          ++prefill_elems;
          differ += std::memcmp(&got[i], &old[i], sizeof(float)) != 0;
        }

    const std::string tag = c.name + " " + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " heads D=" +
                            std::to_string(D) + " bs=" + std::to_string(bs) + " T=" + std::to_string(Tq) +
                            " S=" + std::to_string(S);
    std::printf("[cuda-prefill] %-5s %s\n", dtype_name(dt), tag.c_str());
    std::printf("  vs cpu (%zu elems): worst %.3g (tol %.0e) at %s\n", vs_cpu.n, vs_cpu.err, tol, vs_cpu.at.c_str());
    std::printf("  vs decode kernels (%zu elems): worst %.3g at %s\n", vs_old.n, vs_old.err, vs_old.at.c_str());
    std::printf("  prefill rows differing in bits from the decode kernels: %zu of %zu; sentinel rows off: %zu\n",
                differ, prefill_elems, sentinel_bad);
    EXPECT_EQ(vs_cpu.bad, 0u) << tag << ": " << vs_cpu.bad << " elements off the CPU; worst " << vs_cpu.at;
    EXPECT_EQ(vs_old.bad, 0u) << tag << ": " << vs_old.bad << " elements off the decode kernels; worst " << vs_old.at;
    EXPECT_EQ(sentinel_bad, 0u) << tag << ": rows outside every sequence were written";
    if (dt == DType::f32) {
      EXPECT_EQ(differ, 0u) << tag << ": f32 must keep the decode kernels";
    } else if (prefill_elems > 0) {
      EXPECT_GT(differ, 0u) << tag << ": the prefill kernel did not run (bit-identical to the decode kernels)";
    }
  }

  DType dt = DType::f32;
  std::unique_ptr<Backend> cpu, gpu;
  std::mt19937 rng{20260517};
};

std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return dtype_name(info.param); }

}  // namespace

// Prompts (q_len = context) of 1, 15 (both below the threshold: decode kernels), 16, 17, 100 and
// 1000 tokens in one batch; GQA 8 q heads over 2 KV heads at Gemma's head_dim.
TEST_P(CudaPrefill, VarlenPromptsGqa) {
  run({"prompts", 8, 2, 256, 16, 1.0f, {{1, 1}, {15, 15}, {16, 16}, {17, 17}, {100, 100}, {1000, 1000}}});
}

// gemma-2b's shape (MQA, 8 q heads over 1 KV head) at 4096 tokens.
TEST_P(CudaPrefill, LongPromptMqa) { run({"long prompt", 8, 1, 256, 16, 1.0f, {{4096, 4096}}}); }

// gemma-7b's shape (MHA 16/16), a sharper softmax (q_std 2), a prompt and two chunks.
TEST_P(CudaPrefill, MhaPromptAndChunks) {
  run({"mha", 16, 16, 256, 16, 2.0f, {{1000, 1000}, {64, 64}, {40, 17}, {200, 130}}});
}

// Chunked prefill (the cache already holds earlier tokens) mixed with decode rows and an empty
// sequence, head_dim 128, a block size that is not a power of two.
TEST_P(CudaPrefill, ChunkedPrefillMixedDecodeBs12) {
  run({"chunks+decode", 8, 2, 128, 12, 2.0f,
       {{1000, 100}, {300, 17}, {700, 1}, {4100, 64}, {50, 16}, {33, 1}, {5, 0}, {2000, 200}, {9, 3}}});
}

// MQA at head_dim 128 with block size 7 (pages end inside every key tile).
TEST_P(CudaPrefill, MqaHeadDim128Bs7) {
  run({"mqa bs7", 8, 1, 128, 7, 1.0f, {{513, 513}, {129, 65}, {1, 1}, {80, 16}}});
}

// head_dim 64, MHA, a sharp softmax (q_std 4): the first keys dominate, masking errors show.
TEST_P(CudaPrefill, HeadDim64Mha) { run({"d64", 4, 4, 64, 16, 4.0f, {{100, 100}, {16, 16}, {300, 1}, {47, 33}}}); }

// Keys in blocks outside the cache are masked (GPU paths against each other only).
TEST_P(CudaPrefill, BlocksOutsideCacheMasked) {
  Case c{"bad blocks", 8, 2, 256, 16, 1.0f, {{300, 300}, {100, 40}, {50, 1}}};
  c.bad_blocks = true;
  run(c);
}

// 32 q heads over 1 KV head at D = 256: the group is too large for the grouped kernel, so the mixed
// batch's decode rows take the one-block-per-q-head kernel through its row list.
TEST_P(CudaPrefill, LargeGroupDecodeRowsOnStage1Kernel) {
  run({"group 32", 32, 1, 256, 16, 1.0f, {{100, 100}, {300, 1}, {20, 5}, {64, 64}}});
}

// Only decode rows with host copies: no prefill tile, the decode kernels as without host copies.
TEST_P(CudaPrefill, DecodeOnlyWithHostCopies) {
  run({"decode only", 8, 1, 256, 16, 1.0f, {{1000, 1}, {17, 1}, {4096, 1}, {30, 15}}});
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaPrefill, ::testing::Values(DType::bf16, DType::f16, DType::f32),
                         dtype_param_name);
