// The CUDA multi-LoRA op (lora_sgmv, lora_sgmv_multi) against the CPU backend's lora_sgmv (the
// fp32 reference), in each storage dtype of the CUDA backend. Runs on the GPU machine; without a
// visible GPU every test is skipped (GTEST_SKIP), never passed.
//
// Inputs are drawn in fp32 and rounded to the dtype under test on the host, so both backends see
// the same x, A, B and y; x ~ N(0, 1), A ~ N(0, 1/K), B ~ N(0, 1/r), so v = x A^T and the
// LoRA term are ~N(0, 1), as large as y itself. Per touched element,
//   |gpu - cpu| <= tol * max(|cpu|, rms(cpu)),
// where the CPU keeps v and y in fp32 and the GPU keeps v in fp32 and rounds y once:
//   f32  tol = 3e-5: only the summation order differs (a tree over K on the GPU, left to right on
//        the CPU). The CPU's rounding error over K terms is ~u sqrt(K/6) ~ 4e-6 of v at
//        K = 24576 (u = 2^-24); the worst of ~1e5 elements is ~5 sigma, 2e-5, and the scale
//        max(|y|, rms ~ 1.4) makes it smaller; the matmul test measured 5.3e-6 at K = 16384.
//   bf16 tol = 5e-3: one rounding of y + delta to bf16, at most u = 2^-8 = 0.39% of |y|, plus the
//        fp32 differences above (1e-5); 1.3x headroom over the hard bound.
//   f16  tol = 1e-3: one rounding, u = 2^-11 = 0.049%, plus 1e-5; 2x headroom.
// Every element the op must not touch (rows in no segment, columns outside the problems' ranges)
// must equal the input bitwise.
#include <gtest/gtest.h>

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
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
    case DType::f32: return 3e-5;
    case DType::bf16: return 5e-3;
    case DType::f16: return 1e-3;
    default: return 0;
  }
}

// One module's LoRA in a test case: its column range and segments; segment s uses adapter
// `adapter[s]` of the problem (ranks per adapter).
struct SegSpec {
  int32_t begin, end;
  int adapter;
};
struct ProbSpec {
  int64_t col, N;
  std::vector<int> ranks;  // one per adapter
  std::vector<SegSpec> segs;
};

class CudaLora : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device visible: the CUDA LoRA op was not run";
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

  // Runs the case on the CPU (lora_sgmv per problem, the reference) and on the GPU twice
  // (lora_sgmv_multi with every problem; lora_sgmv per problem) and checks both.
  // misaligned_x: the GPU's x starts one element into its buffer (not 16-byte aligned).
  void run(const std::string& tag, int64_t T, int64_t K, int64_t ldy, const std::vector<ProbSpec>& probs,
           bool misaligned_x = false) {
    const auto x = randn(T * K), y0 = randn(T * ldy);
    std::deque<Tensor> keep;  // segments point at these
    std::vector<LoraProblem> pc, pg;
    std::vector<uint8_t> touched(T * ldy, 0);
    std::vector<int> owner(T * ldy, -1);
    for (size_t p = 0; p < probs.size(); ++p) {
      const ProbSpec& ps = probs[p];
      std::vector<const Tensor*> Ac, Bc, Ag, Bg;
      for (int r : ps.ranks) {
        const auto A = randn(r * K, 1.0f / std::sqrt(static_cast<float>(K)));
        const auto B = randn(ps.N * r, 1.0f / std::sqrt(static_cast<float>(std::max(r, 1))));
        keep.push_back(up(*cpu, A, {r, K}));
        Ac.push_back(&keep.back());
        keep.push_back(up(*cpu, B, {ps.N, r}));
        Bc.push_back(&keep.back());
        keep.push_back(up(*gpu, A, {r, K}));
        Ag.push_back(&keep.back());
        keep.push_back(up(*gpu, B, {ps.N, r}));
        Bg.push_back(&keep.back());
      }
      LoraProblem c{{}, ps.col}, g{{}, ps.col};
      for (const SegSpec& s : ps.segs) {
        c.segments.push_back(LoraSegment{s.begin, s.end, Ac[s.adapter], Bc[s.adapter]});
        g.segments.push_back(LoraSegment{s.begin, s.end, Ag[s.adapter], Bg[s.adapter]});
        if (ps.ranks[s.adapter] == 0) continue;
        for (int32_t t = s.begin; t < s.end; ++t)
          for (int64_t o = 0; o < ps.N; ++o) {
            touched[t * ldy + ps.col + o] = 1;
            owner[t * ldy + ps.col + o] = static_cast<int>(p);
          }
      }
      pc.push_back(std::move(c));
      pg.push_back(std::move(g));
    }

    Tensor xc = up(*cpu, x, {T, K}), yc = up(*cpu, y0, {T, ldy});
    for (const LoraProblem& p : pc) cpu->lora_sgmv(yc, xc, p.segments, p.col_offset);
    const auto want = host(*cpu, yc);

    Tensor xg;
    if (misaligned_x) {
      std::vector<float> padded(T * K + 1, 0.f);
      std::copy(x.begin(), x.end(), padded.begin() + 1);
      keep.push_back(up(*gpu, padded, {T * K + 1}));
      const Tensor& buf = keep.back();
      xg = Tensor(nullptr, static_cast<char*>(buf.data()) + dtype_size(dt), dt, Device::cuda, {T, K});
    } else {
      xg = up(*gpu, x, {T, K});
    }
    Tensor y1 = up(*gpu, y0, {T, ldy}), y2 = up(*gpu, y0, {T, ldy});
    gpu->lora_sgmv_multi(y1, xg, pg);
    for (const LoraProblem& p : pg) gpu->lora_sgmv(y2, xg, p.segments, p.col_offset);
    check(tag + " [multi]", host(*gpu, y1), want, y0, touched, owner, ldy);
    check(tag + " [per problem]", host(*gpu, y2), want, y0, touched, owner, ldy);
  }

  void check(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
             const std::vector<float>& y0, const std::vector<uint8_t>& touched, const std::vector<int>& owner,
             int64_t ldy) {
    ASSERT_EQ(got.size(), want.size());
    double ss = 0;
    size_t n = 0;
    for (size_t k = 0; k < want.size(); ++k)
      if (touched[k]) {
        ss += static_cast<double>(want[k]) * want[k];
        ++n;
      }
    const double rms = n ? std::sqrt(ss / n) : 0, tol = tolerance(dt);
    double worst = 0;
    size_t at = 0, bad = 0, changed = 0, first_changed = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      if (!touched[k]) {
        if (std::memcmp(&got[k], &y0[k], sizeof(float)) != 0 && changed++ == 0) first_changed = k;
        continue;
      }
      const double ref = std::max<double>(std::abs(want[k]), rms);
      const double d = std::abs(static_cast<double>(got[k]) - want[k]);
      const double scaled = ref > 0 ? d / ref : d;
      if (!(scaled <= tol)) ++bad;  // NaN counts as bad
      if (!(scaled <= worst)) {
        worst = scaled;
        at = k;
      }
    }
    std::printf("[cuda-lora] %-5s %-70s max |gpu-cpu|/max(|cpu|,rms) = %.3g (tol %.0e) at row %zu col %zu (problem %d), %zu elements\n",
                dtype_name(dt), what.c_str(), worst, tol, at / ldy, at % ldy, n ? owner[at] : -1, n);
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << n << " touched elements off; worst at row " << at / ldy
                       << " col " << at % ldy << ": gpu " << got[at] << " cpu " << want[at] << " (rms " << rms << ")";
    EXPECT_EQ(changed, 0u) << what << ": " << changed << " elements outside the segments/columns changed; first at row "
                           << first_changed / ldy << " col " << first_changed % ldy << ": " << y0[first_changed]
                           << " -> " << got[first_changed];
  }

  DType dt = DType::f32;
  std::unique_ptr<Backend> cpu, gpu;
  std::mt19937 rng{20261128};
};

std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) { return dtype_name(info.param); }

// One row per segment (decode), every `base_every`-th row a base-model row, each LoRA row's
// adapter drawn at random (so an adapter's rows are scattered over the batch).
std::vector<SegSpec> decode_segments(int64_t T, int adapters, int base_every, std::mt19937& rng) {
  std::vector<SegSpec> s;
  std::uniform_int_distribution<int> pick(0, adapters - 1);
  for (int32_t t = 0; t < T; ++t)
    if (base_every == 0 || t % base_every != base_every - 1) s.push_back({t, t + 1, pick(rng)});
  return s;
}

}  // namespace

// gemma-2b's q/k/v into the fused qkv row (2048 | 256 | 256), 64 LoRA rows among 80, 8 and 32
// adapters of rank 16; then the same rows through o- and down-shaped problems (K = 16384: the
// shrink splits K), one row alone (split K over a single tile), and gemma-7b's down (K = 24576).
TEST_P(CudaLora, DecodeShaped) {
  for (int adapters : {8, 32}) {
    const int64_t T = 80;
    const auto segs = decode_segments(T, adapters, 5, rng);
    ASSERT_EQ(segs.size(), 64u);
    const std::vector<int> ranks(adapters, 16);
    const std::string tag = "decode 64 rows / 80, " + std::to_string(adapters) + " adapters r16";
    run(tag + " qkv K=2048", T, 2048, 2560,
        {ProbSpec{0, 2048, ranks, segs}, ProbSpec{2048, 256, ranks, segs}, ProbSpec{2304, 256, ranks, segs}});
    run(tag + " down K=16384", T, 16384, 2048, {ProbSpec{0, 2048, ranks, segs}});
  }
  {
    const int64_t T = 256;
    const auto segs = decode_segments(T, 32, 0, rng);
    run("decode 256 rows, 32 adapters r16 gate_up K=2048", T, 2048, 2 * 4096,
        {ProbSpec{0, 4096, std::vector<int>(32, 16), segs}, ProbSpec{4096, 4096, std::vector<int>(32, 16), segs}});
  }
  run("decode 1 row r16 down K=16384", 1, 16384, 2048, {ProbSpec{0, 2048, {16}, {{0, 1, 0}}}});
  run("decode 1 row of 3 r64 7b down K=24576", 3, 24576, 3072, {ProbSpec{0, 3072, {64}, {{1, 2, 0}}}});
  run("decode 8 rows 2 adapters r16 7b gate_up N=24576", 8, 3072, 2 * 24576,
      {ProbSpec{0, 24576, {16, 16}, {{0, 3, 0}, {3, 8, 1}}}, ProbSpec{24576, 24576, {16, 16}, {{0, 3, 1}, {3, 8, 0}}}});
}

// Prefill: segments of 1, 7, 300 and 1000 rows with base rows between them; one adapter serves
// two of the segments; ranks 8..64.
TEST_P(CudaLora, PrefillShaped) {
  const int64_t T = 1320;
  // rows: [0,3) base, [3,4) a0, [4,11) a1, [11,13) base, [13,313) a2, [313,1313) a0, [1313,1320) base
  const std::vector<SegSpec> segs = {{3, 4, 0}, {4, 11, 1}, {13, 313, 2}, {313, 1313, 0}};
  run("prefill 1/7/300/1000 rows r16/8/64 gate_up K=2048", T, 2048, 2 * 2048,
      {ProbSpec{0, 2048, {16, 8, 64}, segs}, ProbSpec{2048, 2048, {16, 8, 64}, segs}});
  run("prefill 1/7/300/1000 rows r32/16/16 qkv K=2048", T, 2048, 2560,
      {ProbSpec{0, 2048, {32, 16, 16}, segs}, ProbSpec{2048, 256, {32, 16, 16}, segs},
       ProbSpec{2304, 256, {32, 16, 16}, segs}});
}

// Ranks 1..64 in one call (B rows of odd length: the element-wise path), odd K (A and x
// element-wise) and odd N, columns offset into a wider y; then K a multiple of the vector with
// x misaligned by one element.
TEST_P(CudaLora, MixedRanksOddShapesAndOffsets) {
  std::vector<SegSpec> segs;
  std::vector<int> ranks;
  int32_t t = 2;
  for (int s = 0; s < 64; ++s) {
    const int32_t n = 1 + s % 3;
    segs.push_back({t, t + n, s});
    ranks.push_back(s + 1);
    t += n + (s % 5 == 0 ? 1 : 0);  // a base row now and then
  }
  const int64_t T = t + 3;
  run("ranks 1..64, 1-3 rows each, K=2049 N=25 at col 3 + N=12 at col 28", T, 2049, 40,
      {ProbSpec{3, 25, ranks, segs}, ProbSpec{28, 12, ranks, segs}});
  run("ranks 1..64, 1-3 rows each, K=2048 N=256 at col 1", T, 2048, 300, {ProbSpec{1, 256, ranks, segs}});
  run("ranks 1..64, K=2048 N=256, x misaligned", T, 2048, 256, {ProbSpec{0, 256, ranks, segs}}, true);
  run("rank 3, K=7 N=5, tiny", 4, 7, 9, {ProbSpec{2, 5, {3}, {{1, 3, 0}}}});
}

// The largest ranks the kernel takes, and a clear error above.
TEST_P(CudaLora, Rank128AndTheLimit) {
  const std::vector<SegSpec> segs = {{0, 1, 0}, {2, 7, 1}, {9, 49, 0}};
  run("ranks 128/96 K=3072 N=4096", 50, 3072, 4096, {ProbSpec{0, 4096, {128, 96}, segs}});
  run("rank 128 K=3072 N=256, 1 row", 1, 3072, 256, {ProbSpec{0, 256, {128}, {{0, 1, 0}}}});

  const auto big = randn(129 * 64);
  Tensor A = up(*gpu, big, {129, 64}), B = up(*gpu, big, {64, 129}), x = up(*gpu, randn(2 * 64), {2, 64});
  Tensor y = up(*gpu, randn(2 * 64), {2, 64});
  EXPECT_THROW(gpu->lora_sgmv(y, x, {LoraSegment{0, 1, &A, &B}}, 0), quilt::Error);
}

// Empty segments and problems are skipped; overlapping rows or columns (which concurrent
// tiles could not write safely) are refused.
TEST_P(CudaLora, EmptyAndRefused) {
  run("an empty segment, an empty problem, rank 0", 6, 64, 64,
      {ProbSpec{0, 16, {4, 0}, {{1, 1, 0}, {2, 4, 0}, {4, 6, 1}}}, ProbSpec{16, 16, {4}, {}}});
  const auto a = randn(4 * 64), b = randn(16 * 4);
  Tensor A = up(*gpu, a, {4, 64}), B = up(*gpu, b, {16, 4}), x = up(*gpu, randn(6 * 64), {6, 64});
  Tensor y = up(*gpu, randn(6 * 32), {6, 32});
  EXPECT_THROW(gpu->lora_sgmv(y, x, {LoraSegment{0, 3, &A, &B}, LoraSegment{2, 4, &A, &B}}, 0), quilt::Error);
  EXPECT_THROW(gpu->lora_sgmv_multi(y, x, {LoraProblem{{LoraSegment{0, 3, &A, &B}}, 0},
                                           LoraProblem{{LoraSegment{3, 4, &A, &B}}, 8}}),
               quilt::Error);
  gpu->lora_sgmv_multi(y, x, {});  // nothing to do
  cuda_synchronize(*gpu);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaLora, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         dtype_param_name);
