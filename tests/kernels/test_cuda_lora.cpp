// The CUDA multi-LoRA ops against the CPU backend (the fp32 reference), in each storage dtype of
// the CUDA backend: lora_sgmv / lora_sgmv_multi against the CPU's lora_sgmv, and the step-level
// plan (lora_shrink + lora_expand, Plan* tests) against the CPU's lora_shrink + lora_expand
// (test_lora_plan.cpp: equal to lora_sgmv bit for bit), eagerly and replayed from a graph. Runs
// on the GPU machine; without a visible GPU every test is skipped (GTEST_SKIP), never passed.
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

  // ---- the step-level plan (lora_shrink / lora_expand, lora_plan.h) ----------------------------
  // One module of a plan case: width n at column col of y; ranks per adapter (0: not touched).
  struct ModSpec {
    int64_t col, n;
    std::vector<int> ranks;
  };
  // Adapters on both backends for kLayers layers; the tested layer is the last, the others hold
  // other factors of the same shapes (a kernel reading the wrong layer gets other numbers).
  static constexpr int kLayers = 3, kLayer = 2, kModules = 7;
  struct Rig {
    LoraGroup g;
    std::deque<Tensor> keep;
    std::vector<std::vector<LoraEntry>> ec, eg;  // [adapter][layer * kModules + module]: cpu, gpu
    std::vector<std::vector<int>> ranks;         // [adapter][module of the group]
  };
  void make_rig(Rig& rig, int64_t K, const std::vector<ModSpec>& mods) {
    const size_t adapters = mods.at(0).ranks.size();
    rig.g = LoraGroup{};
    rig.g.k = K;
    for (size_t p = 0; p < mods.size(); ++p) rig.g.add(static_cast<int>(2 * p + 1), mods[p].col, mods[p].n);
    const LoraEntry none{nullptr, nullptr, 0, 0};
    rig.ec.assign(adapters, std::vector<LoraEntry>(kLayers * kModules, none));
    rig.eg = rig.ec;
    rig.ranks.assign(adapters, std::vector<int>(mods.size(), 0));
    for (size_t a = 0; a < adapters; ++a)
      for (int l = 0; l < kLayers; ++l)
        for (size_t p = 0; p < mods.size(); ++p) {
          const int r = mods[p].ranks.at(a);
          rig.ranks[a][p] = r;
          if (r == 0) continue;
          const auto A = randn(r * K, 1.0f / std::sqrt(static_cast<float>(K)));
          const auto B = randn(mods[p].n * r, 1.0f / std::sqrt(static_cast<float>(r)));
          rig.keep.push_back(up(*cpu, A, {r, K}));
          const void* ac = rig.keep.back().data();
          rig.keep.push_back(up(*cpu, B, {mods[p].n, r}));
          const void* bc = rig.keep.back().data();
          rig.keep.push_back(up(*gpu, A, {r, K}));
          const void* ag = rig.keep.back().data();
          rig.keep.push_back(up(*gpu, B, {mods[p].n, r}));
          const void* bg = rig.keep.back().data();
          rig.ec[a][l * kModules + rig.g.module[p]] = LoraEntry{ac, bc, r, 0};
          rig.eg[a][l * kModules + rig.g.module[p]] = LoraEntry{ag, bg, r, 0};
        }
  }
  // The tiles of a row -> adapter map (-1: base row), the adapters taking slots of `table` in the
  // order of their first row (the same slots on both backends when both tables see the same calls).
  std::vector<int32_t> plan_words(LoraTable& table, const std::vector<std::vector<LoraEntry>>& entries,
                                  const std::vector<int32_t>& row_adapter) {
    table.begin_step();
    std::vector<int32_t> row_slot(row_adapter.size(), -1);
    for (size_t t = 0; t < row_adapter.size(); ++t)
      if (row_adapter[t] >= 0) row_slot[t] = table.slot(&entries[row_adapter[t]], entries[row_adapter[t]]);
    return lora_tiles(row_slot);
  }
  LoraStep make_step(Backend& be, const LoraTable& table, int64_t max_tiles, int64_t max_rows) {
    LoraStep s;
    s.table = table.tensor();
    s.tiles = be.zeros({kLoraHeaderInts + max_tiles * kLoraTileInts + max_rows}, DType::i32);
    s.partials = be.zeros({lora_partial_floats(max_tiles)}, DType::f32);
    s.layers = kLayers;
    s.modules = kModules;
    s.max_tiles = static_cast<int>(max_tiles);
    s.max_rows = static_cast<int>(max_rows);
    return s;
  }
  void upload_words(Backend& be, LoraStep& s, const std::vector<int32_t>& words) {
    ASSERT_LE(words[0], s.max_tiles);
    ASSERT_LE(static_cast<int64_t>(words.size()), s.tiles.numel());
    Tensor used = s.tiles.slice_rows(0, static_cast<int64_t>(words.size()));
    be.upload_i32(used, words.data());
  }
  // Elements the plan must change: rows of an adapter, columns of the modules it has.
  void plan_touched(const Rig& rig, const std::vector<int32_t>& row_adapter, int64_t ldy, std::vector<uint8_t>& touched,
                    std::vector<int>& owner) {
    touched.assign(row_adapter.size() * ldy, 0);
    owner.assign(row_adapter.size() * ldy, -1);
    for (size_t t = 0; t < row_adapter.size(); ++t) {
      if (row_adapter[t] < 0) continue;
      for (int p = 0; p < rig.g.count; ++p) {
        if (rig.ranks[row_adapter[t]][p] == 0) continue;
        for (int64_t o = 0; o < rig.g.n[p]; ++o) {
          touched[t * ldy + rig.g.col[p] + o] = 1;
          owner[t * ldy + rig.g.col[p] + o] = p;
        }
      }
    }
  }

  // A plan case: the group of `mods` for rows -> adapters on the CPU (the reference: the same
  // loops as lora_sgmv, test_lora_plan.cpp) and on the GPU with launches sized for max_tiles
  // (the batch bucket; 0: exactly the tiles), the shrink beside the stream and in line (the same
  // bits), and, with `graph`, recorded once and replayed with the plan of `row_adapter2` uploaded
  // into the same buffers (the graph must give what an eager call gives, bit for bit).
  void run_plan(const std::string& tag, int64_t K, int64_t ldy, const std::vector<ModSpec>& mods,
                const std::vector<int32_t>& row_adapter, int64_t max_tiles = 0, bool misaligned_x = false,
                const std::vector<int32_t>* row_adapter2 = nullptr) {
    const int64_t T = static_cast<int64_t>(row_adapter.size());
    Rig rig;
    make_rig(rig, K, mods);
    LoraTable tc(*cpu, kLayers, kModules, 2), tg(*gpu, kLayers, kModules, 2);
    {  // every adapter takes its slot now (the table grows here, not under the graph below)
      std::vector<int32_t> all(rig.ec.size());
      std::iota(all.begin(), all.end(), 0);
      plan_words(tc, rig.ec, all);
      plan_words(tg, rig.eg, all);
    }
    const auto x = randn(T * K), y0 = randn(T * ldy);
    Tensor xc = up(*cpu, x, {T, K});
    Tensor xg;
    if (misaligned_x) {
      std::vector<float> padded(T * K + 1, 0.f);
      std::copy(x.begin(), x.end(), padded.begin() + 1);
      rig.keep.push_back(up(*gpu, padded, {T * K + 1}));
      xg = Tensor(nullptr, static_cast<char*>(rig.keep.back().data()) + dtype_size(dt), dt, Device::cuda, {T, K});
    } else {
      xg = up(*gpu, x, {T, K});
    }
    Tensor y0g = up(*gpu, y0, {T, ldy});

    auto reference = [&](const std::vector<int32_t>& ra) {
      const auto words = plan_words(tc, rig.ec, ra);
      LoraStep s = make_step(*cpu, tc, std::max<int64_t>(words[0], 1), T);
      std::memcpy(s.tiles.data(), words.data(), words.size() * sizeof(int32_t));
      Tensor yc = up(*cpu, y0, {T, ldy});
      cpu->lora_shrink(s, kLayer, rig.g, xc);
      cpu->lora_expand(s, kLayer, rig.g, yc);
      return host(*cpu, yc);
    };
    const auto words = plan_words(tg, rig.eg, row_adapter);
    const int64_t cap = max_tiles > 0 ? max_tiles : std::max<int32_t>(words[0], 1);
    LoraStep sg = make_step(*gpu, tg, cap, T);
    upload_words(*gpu, sg, words);
    Tensor yg = up(*gpu, y0, {T, ldy});
    gpu->lora_shrink(sg, kLayer, rig.g, xg);
    gpu->lora_expand(sg, kLayer, rig.g, yg);
    const auto got = host(*gpu, yg);
    std::vector<uint8_t> touched;
    std::vector<int> owner;
    plan_touched(rig, row_adapter, ldy, touched, owner);
    const std::string name = tag + " (" + std::to_string(words[0]) + " tiles, launch for " + std::to_string(cap) + ")";
    check(name + " [plan]", got, reference(row_adapter), y0, touched, owner, ldy);

    CudaKernelOptions inline_opts;
    inline_opts.lora_overlap = false;
    cuda_set_kernel_options(*gpu, inline_opts);
    gpu->copy(yg, y0g);
    gpu->lora_shrink(sg, kLayer, rig.g, xg);
    gpu->lora_expand(sg, kLayer, rig.g, yg);
    cuda_set_kernel_options(*gpu, CudaKernelOptions{});
    EXPECT_EQ(bitwise_diff(host(*gpu, yg), got), 0u) << name << ": the shrink in line differs from the shrink beside";

    // gate/up-shaped groups: lora_expand_gelu against lora_expand + gelu_tanh_mul on the GPU (the
    // expand's numbers are checked above, gelu_tanh_mul's in test_cuda_ops): the same rounding of
    // gate + dg and up + du, then the same activation; gate_up must stay as it was.
    const bool gelu_shaped = rig.g.count == 2 && rig.g.col[0] == 0 && rig.g.col[1] == rig.g.n[0] &&
                             rig.g.n[0] == rig.g.n[1] && ldy == 2 * rig.g.n[0];
    const int64_t I = gelu_shaped ? rig.g.n[0] : 0;
    Tensor act = gpu->empty({T, std::max<int64_t>(I, 1)}, dt), act_sep = gpu->empty({T, std::max<int64_t>(I, 1)}, dt);
    std::vector<float> fused;
    if (gelu_shaped) {
      gpu->copy(yg, y0g);
      gpu->lora_shrink(sg, kLayer, rig.g, xg);
      gpu->lora_expand(sg, kLayer, rig.g, yg);
      gpu->gelu_tanh_mul(act_sep, yg);
      gpu->lora_shrink(sg, kLayer, rig.g, xg);
      gpu->lora_expand_gelu(sg, kLayer, rig.g, y0g, act);
      fused = host(*gpu, act);
      check_fused(name + " [expand + gelu fused]", fused, host(*gpu, act_sep));
      EXPECT_EQ(bitwise_diff(host(*gpu, y0g), y0), 0u) << name << ": lora_expand_gelu wrote gate_up";
    }

    if (!row_adapter2) return;
    ASSERT_EQ(row_adapter2->size(), row_adapter.size());
    auto graph = gpu->capture_graph([&] {
      gpu->lora_shrink(sg, kLayer, rig.g, xg);
      gpu->lora_expand(sg, kLayer, rig.g, yg);
      if (gelu_shaped) {
        gpu->lora_shrink(sg, kLayer, rig.g, xg);
        gpu->lora_expand_gelu(sg, kLayer, rig.g, y0g, act);
      }
    });
    gpu->copy(yg, y0g);
    graph->launch();
    EXPECT_EQ(bitwise_diff(host(*gpu, yg), got), 0u) << name << ": the graph's replay differs from the eager call";
    if (gelu_shaped) {
      EXPECT_EQ(bitwise_diff(host(*gpu, act), fused), 0u) << name << ": the fused op's replay differs";
    }
    const auto words2 = plan_words(tg, rig.eg, *row_adapter2);  // the same slots' entries: no table growth
    ASSERT_EQ(tg.tensor().data(), sg.table.data()) << "the table grew: the graph would read a stale one";
    upload_words(*gpu, sg, words2);
    gpu->copy(yg, y0g);
    graph->launch();
    const auto got2 = host(*gpu, yg);
    plan_touched(rig, *row_adapter2, ldy, touched, owner);
    check(tag + " (" + std::to_string(words2[0]) + " tiles) [graph replayed with another mix]", got2,
          reference(*row_adapter2), y0, touched, owner, ldy);
    const auto act2 = gelu_shaped ? host(*gpu, act) : std::vector<float>{};
    gpu->copy(yg, y0g);
    gpu->lora_shrink(sg, kLayer, rig.g, xg);
    gpu->lora_expand(sg, kLayer, rig.g, yg);
    EXPECT_EQ(bitwise_diff(host(*gpu, yg), got2), 0u) << name << ": the replay with another mix differs from its eager call";
    if (gelu_shaped) {
      gpu->lora_shrink(sg, kLayer, rig.g, xg);
      gpu->lora_expand_gelu(sg, kLayer, rig.g, y0g, act);
      EXPECT_EQ(bitwise_diff(host(*gpu, act), act2), 0u) << name << ": the fused op's replay with another mix differs";
      gpu->gelu_tanh_mul(act_sep, yg);
      check_fused(tag + " [expand + gelu fused, graph replayed with another mix]", act2, host(*gpu, act_sep));
    }
  }
  // The fused activation against expand + gelu_tanh_mul on the GPU: equal but for the compiler's
  // choices in the activation (contractions, tanhf), so within one rounding of the output dtype
  // of max(|a|, rms) (f32: 1e-6); the bitwise differences are counted.
  void check_fused(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    ASSERT_EQ(got.size(), want.size());
    double ss = 0;
    for (float v : want) ss += static_cast<double>(v) * v;
    const double rms = want.empty() ? 0 : std::sqrt(ss / want.size());
    const double tol = dt == DType::bf16 ? 1.0 / 256 : dt == DType::f16 ? 1.0 / 2048 : 1e-6;
    double worst = 0;
    size_t at = 0, bad = 0;
    for (size_t k = 0; k < got.size(); ++k) {
      const double d = std::abs(static_cast<double>(got[k]) - want[k]) / std::max<double>(std::abs(want[k]), rms);
      if (!(d <= tol)) ++bad;
      if (!(d <= worst)) worst = d, at = k;
    }
    std::printf("[cuda-lora] %-5s %-70s max |fused-separate|/max(|a|,rms) = %.3g (tol %.0e) at %zu, %zu of %zu not bitwise equal\n",
                dtype_name(dt), what.c_str(), worst, tol, at, bitwise_diff(got, want), got.size());
    EXPECT_EQ(bad, 0u) << what << ": worst at " << at << ": fused " << got[at] << " separate " << want[at];
  }
  static size_t bitwise_diff(const std::vector<float>& a, const std::vector<float>& b) {
    size_t n = 0;
    for (size_t k = 0; k < a.size(); ++k) n += std::memcmp(&a[k], &b[k], sizeof(float)) != 0;
    return n;
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

// ---- the step-level plan: lora_shrink + lora_expand (lora_plan.h) -------------------------------

namespace {
// T rows, every `base_every`-th a base row (-1), the others of adapters drawn at random (so an
// adapter's rows are scattered over the batch, in no order).
std::vector<int32_t> random_rows(int64_t T, int adapters, int base_every, std::mt19937& rng) {
  std::vector<int32_t> r(T);
  std::uniform_int_distribution<int> pick(0, adapters - 1);
  for (int64_t t = 0; t < T; ++t) r[t] = base_every > 0 && t % base_every == base_every - 1 ? -1 : pick(rng);
  return r;
}
// Rows grouped by adapter (as bench-step and the worker give them): adapter a owns [T a / A, T (a + 1) / A).
std::vector<int32_t> grouped_rows(int64_t T, int adapters) {
  std::vector<int32_t> r(T);
  for (int64_t t = 0; t < T; ++t) r[t] = static_cast<int32_t>(t * adapters / T);
  return r;
}
}  // namespace

// Decode batches of gemma-2b's shapes in a bucket of 64 rows: 1, 8 and 32 adapters of rank 16,
// rows grouped and scattered, base rows among them; q/k/v into the fused row (3 modules), o,
// gate/up (2 modules of 16384, also through lora_expand_gelu) and down (K = 16384: the K splits
// meet in the shrink's last block). The qkv, gate/up and down cases are recorded as graphs and
// replayed with another adapter mix (37 rows of the 64, the rest padding).
TEST_P(CudaLora, PlanDecodeShaped) {
  for (int adapters : {1, 8, 32}) {
    const std::vector<int> r16(adapters, 16);
    const auto grouped = grouped_rows(64, adapters);
    const auto scattered = random_rows(64, adapters, 5, rng);
    auto fewer = random_rows(64, adapters, 3, rng);  // then 37 rows of the bucket of 64: padding rows after
    std::fill(fewer.begin() + 37, fewer.end(), -1);
    const std::string tag = "plan decode 64, " + std::to_string(adapters) + " adapters r16";
    run_plan(tag + " qkv K=2048 grouped", 2048, 2560, {{0, 2048, r16}, {2048, 256, r16}, {2304, 256, r16}}, grouped, 64,
             false, &scattered);
    run_plan(tag + " o K=2048 scattered", 2048, 2048, {{0, 2048, r16}}, scattered, 64);
    run_plan(tag + " gate_up K=2048 scattered", 2048, 2 * 16384, {{0, 16384, r16}, {16384, 16384, r16}}, scattered, 64,
             false, &fewer);
    run_plan(tag + " down K=16384 grouped", 16384, 2048, {{0, 2048, r16}}, grouped, 64, false, &fewer);
  }
  // One row in a bucket of 1 (K split 64 ways), 3 rows of 7b's down at rank 64, 7b's gate_up.
  run_plan("plan decode 1 row r16 down K=16384", 16384, 2048, {{0, 2048, {16}}}, {0}, 1);
  run_plan("plan decode 1 of 3 rows r64 7b down K=24576", 24576, 3072, {{0, 3072, {64}}}, {-1, 0, -1}, 4);
  run_plan("plan decode 8 rows 2 adapters r16 7b gate_up N=24576", 3072, 2 * 24576,
           {{0, 24576, {16, 16}}, {24576, 24576, {16, 16}}}, {0, 1, 1, 0, 0, 1, 1, 1}, 8);
}

// Prefill-sized plans: 1320 rows (165 tiles: more work items than blocks), segments of 1, 7, 300
// and 1000 rows with base rows between, one adapter on two segments, ranks 8..64.
TEST_P(CudaLora, PlanPrefillShaped) {
  std::vector<int32_t> rows(1320, -1);
  auto span = [&](int b, int e, int a) { std::fill(rows.begin() + b, rows.begin() + e, a); };
  span(3, 4, 0);
  span(4, 11, 1);
  span(13, 313, 2);
  span(313, 1313, 0);
  run_plan("plan prefill 1/7/300/1000 rows r16/8/64 gate_up K=2048", 2048, 2 * 2048,
           {{0, 2048, {16, 8, 64}}, {2048, 2048, {16, 8, 64}}}, rows);
  run_plan("plan prefill 1/7/300/1000 rows r32/16/16 qkv K=2048", 2048, 2560,
           {{0, 2048, {32, 16, 16}}, {2048, 256, {32, 16, 16}}, {2304, 256, {32, 16, 16}}}, rows);
  run_plan("plan prefill down K=16384 r16/8/64", 16384, 2048, {{0, 2048, {16, 8, 64}}}, rows, 0);
}

// Every rank from 1 to 64 in one call, with 1-3 rows per adapter in a random order; an adapter
// without the second module and one with neither (its rows stay untouched); odd K and N (the
// element-wise paths), columns offset into a wider y; x misaligned; ranks 128 and 96; a tiny case.
TEST_P(CudaLora, PlanMixedRanksOddShapes) {
  std::vector<int> ranks(64), ranks2(64);
  for (int a = 0; a < 64; ++a) ranks[a] = ranks2[a] = a + 1;
  ranks2[5] = 0;                  // adapter 5 has no second module
  ranks[7] = ranks2[7] = 0;       // adapter 7 has neither
  std::vector<int32_t> rows;
  for (int a = 0; a < 64; ++a)
    for (int k = 0; k < 1 + a % 3; ++k) rows.push_back(a);
  rows.push_back(-1);
  std::shuffle(rows.begin(), rows.end(), rng);
  const int64_t T = static_cast<int64_t>(rows.size());
  run_plan("plan ranks 1..64 shuffled, K=2049 N=25 at col 3 + N=12 at col 28", 2049, 40,
           {{3, 25, ranks}, {28, 12, ranks2}}, rows, T);
  run_plan("plan ranks 1..64 shuffled, K=2048 N=256 at col 1", 2048, 300, {{1, 256, ranks}}, rows, T);
  run_plan("plan ranks 1..64 shuffled, K=2048 N=256, x misaligned", 2048, 256, {{0, 256, ranks}}, rows, T, true);
  run_plan("plan ranks 128/96 K=3072 N=4096", 3072, 4096, {{0, 4096, {128, 96}}}, {0, -1, 1, 1, 1, 1, 1, -1, -1, 0, 0});
  run_plan("plan rank 3 K=7 N=5 tiny", 7, 9, {{2, 5, {3}}}, {-1, 0, 0, -1}, 4);
}

// No adapter rows: nothing changes, with launches sized for a bucket all the same.
TEST_P(CudaLora, PlanWithoutTilesChangesNothing) {
  run_plan("plan, 16 base rows", 2048, 2560, {{0, 2048, {16}}, {2048, 256, {16}}, {2304, 256, {16}}},
           std::vector<int32_t>(16, -1), 16);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaLora, ::testing::Values(DType::f32, DType::bf16, DType::f16),
                         dtype_param_name);
