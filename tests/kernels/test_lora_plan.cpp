// The step-level multi-LoRA plan (quilt/kernels/lora_plan.h) on the CPU backend: the tiles built
// from a row -> slot map, the table's slots (kept, re-uploaded only on change, reused, grown),
// and the CPU's lora_shrink + lora_expand through a plan against lora_sgmv per segment (the
// reference the CUDA kernels and the model were checked against): the same loops, so the same
// floats bit for bit, and rows in no tile untouched.
#include <gtest/gtest.h>

#include <cstring>
#include <deque>
#include <random>

#include "quilt/kernels/backend.h"
#include "quilt/kernels/lora_plan.h"
#include "runtime/core/check.h"

using namespace quilt;

namespace {

std::vector<LoraTile> tiles_of(const std::vector<int32_t>& words) {
  std::vector<LoraTile> t(static_cast<size_t>(words.at(0)));
  if (!t.empty()) std::memcpy(t.data(), words.data() + kLoraHeaderInts, t.size() * sizeof(LoraTile));
  EXPECT_EQ(words.size(), kLoraHeaderInts + t.size() * kLoraTileInts + words.at(1));
  return t;
}

}  // namespace

TEST(LoraPlan, TilesGroupRowsBySlotInOrder) {
  // rows: slot 3 on the 10 even rows, slot 0 on rows 5 and 9, base rows (-1) between them
  std::vector<int32_t> rs;
  for (int t = 0; t < 20; ++t) rs.push_back(t % 2 == 0 ? 3 : (t == 5 || t == 9 ? 0 : -1));
  const auto tiles = tiles_of(lora_tiles(rs));
  ASSERT_EQ(tiles.size(), 3u);
  EXPECT_EQ(tiles[0].slot, 3);
  EXPECT_EQ(tiles[0].nrows, 8);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(tiles[0].rows[i], 2 * i);
  EXPECT_EQ(tiles[1].slot, 3);  // a slot's tiles together, then the next slot's
  EXPECT_EQ(tiles[1].nrows, 2);
  EXPECT_EQ(tiles[1].rows[0], 16);
  EXPECT_EQ(tiles[1].rows[1], 18);
  EXPECT_EQ(tiles[2].slot, 0);
  EXPECT_EQ(tiles[2].nrows, 2);
  EXPECT_EQ(tiles[2].rows[0], 5);
  EXPECT_EQ(tiles[2].rows[1], 9);
  {  // then the base rows, in order
    const auto words = lora_tiles(rs);
    const std::vector<int32_t> base(words.end() - words[1], words.end());
    EXPECT_EQ(base, (std::vector<int32_t>{1, 3, 7, 11, 13, 15, 17, 19}));
  }
  EXPECT_EQ(lora_tiles(std::vector<int32_t>(5, -1)).at(0), 0);
  EXPECT_EQ(lora_tiles(std::vector<int32_t>(5, -1)).at(1), 5);
  EXPECT_EQ(lora_tiles({}).at(0), 0);
  // One row per slot: as many tiles as rows, the most a bucket of T rows can need.
  std::vector<int32_t> distinct(64);
  for (int t = 0; t < 64; ++t) distinct[t] = 63 - t;
  EXPECT_EQ(lora_tiles(distinct).at(0), 64);
}

TEST(LoraPlan, SplitsCoverKAndStayWithinThePartials) {
  for (int64_t K : {1, 7, 255, 256, 2048, 2049, 16384, 24576})
    for (int granule : {128, 256})
      for (int ntiles : {1, 2, 3, 8, 17, 64, 255, 256, 1000}) {
        const LoraSplit s = lora_split(K, ntiles, granule);
        ASSERT_GE(s.splits, 1);
        EXPECT_EQ(s.chunk % granule, 0) << K;
        EXPECT_GE(s.splits * s.chunk, K);
        EXPECT_LT((s.splits - 1) * s.chunk, K) << "an empty split, K " << K << " tiles " << ntiles;
        EXPECT_LT(int64_t{s.splits} * ntiles, kLoraTargetItems + ntiles) << K << " " << ntiles;
      }
}

TEST(LoraPlan, TableKeepsSlotsAndUploadsOnlyChanges) {
  auto be = make_backend("cpu");
  LoraTable table(*be, 2, 3, 2);
  int a = 1, b = 2, c = 3;  // keys
  auto entries = [](int tag) {
    std::vector<LoraEntry> e(6, LoraEntry{nullptr, nullptr, 0, 0});
    e[tag % 6] = LoraEntry{reinterpret_cast<const void*>(uintptr_t(16 * tag)), reinterpret_cast<const void*>(uintptr_t(32 * tag)), tag, 0};
    return e;
  };
  auto row = [&](int slot) {
    const auto* p = reinterpret_cast<const LoraEntry*>(table.tensor().data()) + slot * 6;
    return std::vector<LoraEntry>(p, p + 6);
  };
  auto same = [](const std::vector<LoraEntry>& x, const std::vector<LoraEntry>& y) {
    return std::memcmp(x.data(), y.data(), x.size() * sizeof(LoraEntry)) == 0;
  };
  table.begin_step();
  const int sa = table.slot(&a, entries(1)), sb = table.slot(&b, entries(2));
  EXPECT_NE(sa, sb);
  EXPECT_EQ(table.uploads(), 12u);
  EXPECT_TRUE(same(row(sa), entries(1)));
  EXPECT_TRUE(same(row(sb), entries(2)));
  EXPECT_TRUE(table.holds(&a, entries(1)));
  EXPECT_FALSE(table.holds(&a, entries(4)));
  EXPECT_FALSE(table.holds(&c, entries(3)));
  table.begin_step();
  EXPECT_EQ(table.slot(&a, entries(1)), sa);  // unchanged: no upload
  EXPECT_EQ(table.uploads(), 12u);
  EXPECT_EQ(table.slot(&a, entries(4)), sa);  // same key, new entries (an adapter installed in its slot)
  EXPECT_EQ(table.uploads(), 18u);
  EXPECT_TRUE(same(row(sa), entries(4)));
  // c takes b's slot (not used in this step), and the table keeps its size and epoch.
  EXPECT_EQ(table.slot(&c, entries(3)), sb);
  EXPECT_EQ(table.capacity(), 2);
  EXPECT_EQ(table.epoch(), 0u);
  // A fourth key while a, c are in use: the table grows, keeps their rows, and says so.
  const int sb2 = table.slot(&b, entries(2));
  EXPECT_EQ(table.capacity(), 4);
  EXPECT_EQ(table.epoch(), 1u);
  EXPECT_TRUE(same(row(sa), entries(4)));
  EXPECT_TRUE(same(row(sb), entries(3)));
  EXPECT_TRUE(same(row(sb2), entries(2)));
}

namespace {

// One module: width n at column col of y, ranks per adapter (0: the adapter does not touch it).
struct ModSpec {
  int64_t col, n;
  std::vector<int> ranks;
};

// Runs a group of modules through a plan and through lora_sgmv per segment (one segment per row)
// on the CPU backend, and compares bitwise.
void check_against_sgmv(const std::string& what, int64_t T, int64_t K, int64_t ldy, const std::vector<ModSpec>& mods,
                        const std::vector<int32_t>& row_adapter, std::mt19937& rng) {
  auto be = make_backend("cpu");
  std::normal_distribution<float> N(0.f, 1.f);
  auto randn = [&](int64_t n, float sd) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = sd * N(rng);
    return v;
  };
  const int adapters = static_cast<int>(mods[0].ranks.size());
  const int layers = 2, layer = 1, modules = 7;
  std::deque<Tensor> keep;
  // entries[adapter][layer][module]
  std::vector<std::vector<LoraEntry>> entries(adapters, std::vector<LoraEntry>(layers * modules, LoraEntry{nullptr, nullptr, 0, 0}));
  std::vector<std::vector<std::pair<const Tensor*, const Tensor*>>> ab(adapters, std::vector<std::pair<const Tensor*, const Tensor*>>(mods.size()));
  LoraGroup g;
  g.k = K;
  for (size_t p = 0; p < mods.size(); ++p) {
    g.add(static_cast<int>(2 * p + 1), mods[p].col, mods[p].n);
    for (int a = 0; a < adapters; ++a) {
      const int r = mods[p].ranks[a];
      if (r == 0) continue;
      const auto A = randn(r * K, 1.f / std::sqrt(float(K))), B = randn(mods[p].n * r, 1.f);
      keep.push_back(be->from_host(A.data(), DType::f32, {r, K}));
      const Tensor* ta = &keep.back();
      keep.push_back(be->from_host(B.data(), DType::f32, {mods[p].n, r}));
      const Tensor* tb = &keep.back();
      ab[a][p] = {ta, tb};
      entries[a][layer * modules + g.module[p]] = LoraEntry{ta->data(), tb->data(), r, 0};
    }
  }
  LoraTable table(*be, layers, modules, 1);  // grows while the adapters take slots
  table.begin_step();
  std::vector<int32_t> row_slot(T, -1);
  for (int64_t t = 0; t < T; ++t)
    if (row_adapter[t] >= 0) row_slot[t] = table.slot(&entries[row_adapter[t]], entries[row_adapter[t]]);
  const auto words = lora_tiles(row_slot);
  LoraStep step;
  step.table = table.tensor();
  step.tiles = be->from_host_i32(words.data(), {static_cast<int64_t>(words.size())});
  step.max_tiles = words[0];
  step.partials = be->zeros({lora_partial_floats(step.max_tiles)}, DType::f32);
  step.layers = layers;
  step.modules = modules;

  const auto x = randn(T * K, 1.f), y0 = randn(T * ldy, 1.f);
  Tensor tx = be->from_host(x.data(), DType::f32, {T, K});
  Tensor y1 = be->from_host(y0.data(), DType::f32, {T, ldy}), y2 = be->from_host(y0.data(), DType::f32, {T, ldy});
  be->lora_shrink(step, layer, g, tx);
  be->lora_expand(step, layer, g, y1);
  for (size_t p = 0; p < mods.size(); ++p) {
    std::vector<LoraSegment> segs;
    for (int64_t t = 0; t < T; ++t) {
      const int a = row_adapter[t];
      if (a >= 0 && mods[p].ranks[a] > 0)
        segs.push_back(LoraSegment{static_cast<int32_t>(t), static_cast<int32_t>(t + 1), ab[a][p].first, ab[a][p].second});
    }
    be->lora_sgmv(y2, tx, segs, mods[p].col);
  }
  size_t diff = 0, changed = 0;
  for (int64_t k = 0; k < T * ldy; ++k) {
    diff += std::memcmp(y1.as<float>() + k, y2.as<float>() + k, sizeof(float)) != 0;
    changed += std::memcmp(y1.as<float>() + k, y0.data() + k, sizeof(float)) != 0;
  }
  EXPECT_EQ(diff, 0u) << what << ": the plan's result differs from lora_sgmv's";
  EXPECT_GT(changed, 0u) << what;
  // Base rows bitwise untouched.
  for (int64_t t = 0; t < T; ++t) {
    if (row_adapter[t] < 0) {
      EXPECT_EQ(std::memcmp(y1.as<float>() + t * ldy, y0.data() + t * ldy, ldy * sizeof(float)), 0) << what << " row " << t;
    }
  }
}

}  // namespace

TEST(LoraPlan, CpuShrinkExpandEqualLoraSgmv) {
  std::mt19937 rng(7);
  // q/k/v-like: 3 modules, 5 adapters of ranks 1..16 (one without k), rows in any order, base rows.
  std::vector<int32_t> ra;
  for (int t = 0; t < 23; ++t) ra.push_back(t % 6 == 5 ? -1 : (t * 7) % 5);
  check_against_sgmv("qkv-like", 23, 40, 70, {{0, 32, {4, 8, 16, 1, 3}}, {32, 16, {4, 0, 2, 5, 3}}, {48, 16, {7, 8, 16, 2, 3}}},
                     ra, rng);
  // one module, 20 rows of one adapter (three tiles), one row of another
  std::vector<int32_t> rb(21, 0);
  rb[10] = 1;
  check_against_sgmv("o-like", 21, 33, 9, {{0, 9, {12, 128}}}, rb, rng);
}

// lora_expand_gelu: the same floats as lora_expand into gate_up and then gelu_tanh_mul, gate_up
// left as it was; rows in no tile (listed as base rows) get the activation alone. Adapter 2 has no
// gate and adapter 3 neither gate nor up.
TEST(LoraPlan, CpuExpandGeluEqualsExpandThenGelu) {
  auto be = make_backend("cpu");
  std::mt19937 rng(11);
  std::normal_distribution<float> N(0.f, 1.f);
  auto randn = [&](int64_t n, float sd) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = sd * N(rng);
    return v;
  };
  const int64_t T = 19, K = 24, I = 40;
  const int layers = 1, modules = 7, gate = 4, up = 5;
  const std::vector<int> rg{4, 16, 0, 0}, ru{8, 2, 5, 0};
  std::deque<Tensor> keep;
  std::vector<std::vector<LoraEntry>> entries(4, std::vector<LoraEntry>(layers * modules, LoraEntry{nullptr, nullptr, 0, 0}));
  for (int a = 0; a < 4; ++a)
    for (auto [mod, r] : {std::pair{gate, rg[a]}, std::pair{up, ru[a]}}) {
      if (r == 0) continue;
      const auto A = randn(r * K, 0.3f), B = randn(I * r, 0.5f);
      keep.push_back(be->from_host(A.data(), DType::f32, {r, K}));
      const void* pa = keep.back().data();
      keep.push_back(be->from_host(B.data(), DType::f32, {I, r}));
      entries[a][mod] = LoraEntry{pa, keep.back().data(), r, 0};
    }
  LoraTable table(*be, layers, modules);
  table.begin_step();
  std::vector<int32_t> row_slot(T, -1);
  for (int64_t t = 0; t < T; ++t)
    if (t % 5 != 4) row_slot[t] = table.slot(&entries[(t * 3) % 4], entries[(t * 3) % 4]);
  const auto words = lora_tiles(row_slot);
  ASSERT_EQ(words[1], 3);  // rows 4, 9, 14
  LoraStep step;
  step.table = table.tensor();
  step.tiles = be->from_host_i32(words.data(), {static_cast<int64_t>(words.size())});
  step.max_tiles = words[0];
  step.max_rows = static_cast<int>(T);
  step.partials = be->zeros({lora_partial_floats(step.max_tiles)}, DType::f32);
  step.layers = layers;
  step.modules = modules;
  LoraGroup g;
  g.k = K;
  g.add(gate, 0, I);
  g.add(up, I, I);
  const auto x = randn(T * K, 1.f), gu = randn(T * 2 * I, 1.f);
  Tensor tx = be->from_host(x.data(), DType::f32, {T, K});
  Tensor gu1 = be->from_host(gu.data(), DType::f32, {T, 2 * I}), gu2 = be->from_host(gu.data(), DType::f32, {T, 2 * I});
  Tensor act1 = be->zeros({T, I}, DType::f32), act2 = be->zeros({T, I}, DType::f32);
  be->lora_shrink(step, 0, g, tx);
  be->lora_expand(step, 0, g, gu1);
  be->gelu_tanh_mul(act1, gu1);
  be->lora_expand_gelu(step, 0, g, gu2, act2);
  EXPECT_EQ(std::memcmp(act1.data(), act2.data(), act1.bytes()), 0) << "the fused op differs from expand + gelu";
  EXPECT_EQ(std::memcmp(gu2.data(), gu.data(), gu2.bytes()), 0) << "the fused op wrote gate_up";
  EXPECT_NE(std::memcmp(gu1.data(), gu.data(), gu1.bytes()), 0) << "the plan added nothing";
}
