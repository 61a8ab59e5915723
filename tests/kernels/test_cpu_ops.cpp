// Every CPU op against small hand-computed cases.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "quilt/kernels/backend.h"

using quilt::DType;
using quilt::Tensor;

namespace {
class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<quilt::Backend> be = quilt::make_backend("cpu");
  Tensor f(std::vector<float> v, std::vector<int64_t> shape) { return be->from_host(v.data(), DType::f32, shape); }
  Tensor i(std::vector<int32_t> v) { return be->from_host_i32(v.data(), {static_cast<int64_t>(v.size())}); }
  std::vector<float> host(const Tensor& t) {
    std::vector<float> v(t.numel());
    be->to_host_f32(v.data(), t);
    return v;
  }
};

void expect_near(const std::vector<float>& got, const std::vector<float>& want, float tol = 1e-5f) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t k = 0; k < got.size(); ++k) EXPECT_NEAR(got[k], want[k], tol) << "at " << k;
}
}  // namespace

TEST_F(CpuOps, EmbeddingScalesAndMasksForeignIds) {
  Tensor table = f({1, 2, 3, 4, 5, 6}, {3, 2});
  Tensor out = be->empty({3, 2}, DType::f32);
  be->embedding(out, table, i({2, 0, 7}), 0, 2.0f);
  expect_near(host(out), {10, 12, 2, 4, 0, 0});
  be->embedding(out, table, i({4, 2, 5}), 3, 1.0f);  // shard holding ids [3, 6)
  expect_near(host(out), {3, 4, 0, 0, 5, 6});
}

TEST_F(CpuOps, RmsNormUsesOnePlusWeight) {
  Tensor out = be->empty({2, 2}, DType::f32);
  be->rms_norm(out, f({3, 4, 0, 2}, {2, 2}), f({0, 1}, {2}), 0.0f);
  // row 1: rms = sqrt(12.5); row 2: rms = sqrt(2)
  const float r1 = 1 / std::sqrt(12.5f), r2 = 1 / std::sqrt(2.0f);
  expect_near(host(out), {3 * r1, 8 * r1, 0, 4 * r2});
  be->rms_norm(out, f({1, 1, 1, 1}, {2, 2}), f({0, 0}, {2}), 1.0f);  // eps counts: 1/sqrt(2)
  expect_near(host(out), {r2, r2, r2, r2});
}

TEST_F(CpuOps, AddRmsNormUpdatesResidual) {
  Tensor res = f({1, 1}, {1, 2});
  Tensor out = be->empty({1, 2}, DType::f32);
  be->add_rms_norm(res, out, f({2, 3}, {1, 2}), f({0, 1}, {2}), 0.0f);
  expect_near(host(res), {3, 4});
  const float r = 1 / std::sqrt(12.5f);
  expect_near(host(out), {3 * r, 8 * r});
}

TEST_F(CpuOps, MatmulIsXTimesWTransposed) {
  Tensor y = be->empty({2, 3}, DType::f32);
  Tensor x = f({1, 2, 3, 4}, {2, 2});
  Tensor w = f({1, 0, 0, 1, 1, 1}, {3, 2});
  be->matmul(y, x, w, false);
  expect_near(host(y), {1, 2, 3, 3, 4, 7});
  be->matmul(y, x, w, true);
  expect_near(host(y), {2, 4, 6, 6, 8, 14});
}

TEST_F(CpuOps, RopeRotatesHalvesOfQAndKOnly) {
  // One q head, one k head, one v head, head_dim 4: pairs (0, 2) at freq 1, (1, 3) at 1e-2.
  std::vector<float> row = {1, 2, 3, 4, 1, 2, 3, 4, 9, 9, 9, 9};
  std::vector<float> two = row;
  two.insert(two.end(), row.begin(), row.end());
  Tensor qkv = f(two, {2, 12});
  be->rope(qkv, i({0, 1}), quilt::RopeParams{1, 1, 4, 10000.f});
  const auto h = host(qkv);
  for (int k = 0; k < 12; ++k) EXPECT_FLOAT_EQ(h[k], row[k]);  // position 0 is the identity
  const double c1 = std::cos(1.0), s1 = std::sin(1.0), c2 = std::cos(0.01), s2 = std::sin(0.01);
  const std::vector<float> rot = {float(1 * c1 - 3 * s1), float(2 * c2 - 4 * s2), float(3 * c1 + 1 * s1),
                                  float(4 * c2 + 2 * s2)};
  for (int head = 0; head < 2; ++head)
    for (int d = 0; d < 4; ++d) EXPECT_NEAR(h[12 + head * 4 + d], rot[d], 1e-5);
  for (int d = 8; d < 12; ++d) EXPECT_EQ(h[12 + d], 9.0f);  // v untouched
}

TEST_F(CpuOps, GeluTanhMul) {
  Tensor out = be->empty({1, 3}, DType::f32);
  be->gelu_tanh_mul(out, f({0, 1, -1, 1, 2, 3}, {1, 6}));
  // gelu_tanh(1) = 0.8411920, gelu_tanh(-1) = -0.1588080
  expect_near(host(out), {0, 2 * 0.8411920f, 3 * -0.1588080f}, 1e-6f);
}

TEST_F(CpuOps, GatherRows) {
  Tensor out = be->empty({2, 2}, DType::f32);
  be->gather_rows(out, f({1, 2, 3, 4, 5, 6}, {3, 2}), i({2, 0}));
  expect_near(host(out), {5, 6, 1, 2});
}

// Two query heads share one KV head (MQA), head_dim 2, block size 2, scale 1. Keys k0=[0,0],
// k1=[1,0], k2=[0,1]; values v0=[1,0], v1=[0,1], v2=[1,1]. With the queries below the softmax
// weights are hand-computable: ln 3 gives 1:3, ln 2 gives 1:1:2.
TEST_F(CpuOps, PagedAttentionPrefillDecodeAndChunks) {
  const float l3 = std::log(3.0f), l2 = std::log(2.0f);
  auto tok = [](std::vector<float> q0, std::vector<float> q1, std::vector<float> k, std::vector<float> v) {
    std::vector<float> r = q0;
    r.insert(r.end(), q1.begin(), q1.end());
    r.insert(r.end(), k.begin(), k.end());
    r.insert(r.end(), v.begin(), v.end());
    return r;
  };
  std::vector<float> rows;
  for (auto r : {tok({0, 0}, {0, 0}, {0, 0}, {1, 0}), tok({0, 0}, {l3, 0}, {1, 0}, {0, 1}),
                 tok({0, l2}, {0, 0}, {0, 1}, {1, 1})})
    rows.insert(rows.end(), r.begin(), r.end());
  Tensor qkv = f(rows, {3, 8});
  Tensor kc = be->kv_cache_tensor(4, 2, 1, 2), vc = be->kv_cache_tensor(4, 2, 1, 2);
  // The sequence's blocks are 3 then 1 (not in order): positions 0,1 -> slots 6,7; 2 -> slot 2.
  be->write_kv_cache(kc, vc, qkv, i({6, 7, 2}), quilt::KvWriteParams{2, 1, 2, 2});
  Tensor tables = be->from_host_i32(std::vector<int32_t>{3, 1}.data(), {1, 2});
  quilt::AttentionParams p{2, 1, 2, 2, 2, 1.0f};
  Tensor out = be->empty({3, 4}, DType::f32);
  be->paged_attention(out, qkv, kc, vc, i({0, 3}), i({3}), tables, p);
  expect_near(host(out), {1, 0, 1, 0,          // token 0 sees only v0
                          0.5, 0.5, 0.25, 0.75,  // token 1: 1:1 and 1:3
                          0.75, 0.75, 2.0f / 3, 2.0f / 3});  // 1:1:2 and uniform

  // Decode: token 2 alone over the cached context of 3 gives the same row.
  Tensor one = be->empty({1, 4}, DType::f32);
  be->paged_attention(one, qkv.slice_rows(2, 3), kc, vc, i({0, 1}), i({3}), tables, p);
  expect_near(host(one), {0.75, 0.75, 2.0f / 3, 2.0f / 3});

  // A chunk: tokens 1 and 2 as the last two of the context, batched with a second sequence that
  // decodes token 0 of its own (block 0, which holds a copy of position 0).
  be->write_kv_cache(kc, vc, qkv.slice_rows(0, 1), i({0}), quilt::KvWriteParams{2, 1, 2, 2});
  std::vector<float> batch(rows.begin() + 8, rows.end());
  batch.insert(batch.end(), rows.begin(), rows.begin() + 8);
  Tensor two_seq = f(batch, {3, 8});
  Tensor tables2 = be->from_host_i32(std::vector<int32_t>{3, 1, 0, 0}.data(), {2, 2});
  Tensor out3 = be->empty({3, 4}, DType::f32);
  be->paged_attention(out3, two_seq, kc, vc, i({0, 2, 3}), i({3, 1}), tables2, p);
  expect_near(host(out3), {0.5, 0.5, 0.25, 0.75, 0.75, 0.75, 2.0f / 3, 2.0f / 3, 1, 0, 1, 0});
}

TEST_F(CpuOps, WriteKvCacheSkipsPaddingSlots) {
  Tensor kc = be->kv_cache_tensor(1, 2, 1, 1), vc = be->kv_cache_tensor(1, 2, 1, 1);
  // rows: q, k, v with one head of dim 1
  Tensor qkv = f({0, 5, 6, 0, 7, 8}, {2, 3});
  be->write_kv_cache(kc, vc, qkv, i({-1, 1}), quilt::KvWriteParams{1, 1, 1, 2});
  expect_near(host(kc), {0, 7});
  expect_near(host(vc), {0, 8});
}

// y[rows, col : col + N] += (x A^T) B^T by hand, then lora_sgmv_multi against lora_sgmv per
// problem (the default multi loops over it: bitwise equal), base rows and other columns untouched.
TEST_F(CpuOps, LoraSgmvAndMultiMatchPerProblemCalls) {
  // x rows (1, 2) and (3, 4); A = [[1, 0], [0, 1]] (r = 2), B = [[1, 1]] (N = 1): y += x0 + x1
  Tensor x = f({1, 2, 3, 4, 5, 6}, {3, 2}), A = f({1, 0, 0, 1}, {2, 2}), B = f({1, 1}, {1, 2});
  Tensor y = f({0, 0, 0, 10, 10, 10, 20, 20, 20}, {3, 3});
  be->lora_sgmv(y, x, {quilt::LoraSegment{1, 3, &A, &B}}, 1);
  expect_near(host(y), {0, 0, 0, 10, 17, 10, 20, 31, 20});

  std::mt19937 rng(7);
  std::normal_distribution<float> N(0.f, 1.f);
  auto rnd = [&](std::vector<int64_t> shape) {
    std::vector<float> v(static_cast<size_t>(shape[0] * shape[1]));
    for (float& e : v) e = N(rng);
    return f(v, shape);
  };
  const int64_t T = 9, K = 13, ldy = 20;
  Tensor xr = rnd({T, K});
  // q-, k- and v-like problems: columns [0, 8), [8, 11), [11, 20); ranks 1..4 and a shared adapter
  std::vector<Tensor> As = {rnd({1, K}), rnd({4, K}), rnd({3, K}), rnd({2, K})};
  std::vector<Tensor> Bs = {rnd({8, 1}), rnd({3, 4}), rnd({9, 3}), rnd({8, 2})};
  const std::vector<quilt::LoraProblem> problems = {
      {{{0, 2, &As[0], &Bs[0]}, {3, 4, &As[3], &Bs[3]}, {5, 8, &As[0], &Bs[0]}}, 0},
      {{{0, 2, &As[1], &Bs[1]}, {6, 7, &As[1], &Bs[1]}}, 8},
      {},
      {{{1, 2, &As[2], &Bs[2]}, {4, 4, &As[2], &Bs[2]}, {5, 9, &As[2], &Bs[2]}}, 11},
  };
  const std::vector<float> y0 = host(rnd({T, ldy}));
  Tensor y1 = f(y0, {T, ldy}), y2 = f(y0, {T, ldy});
  be->lora_sgmv_multi(y1, xr, problems);
  for (const auto& p : problems) be->lora_sgmv(y2, xr, p.segments, p.col_offset);
  const auto got = host(y1), want = host(y2);
  ASSERT_EQ(got.size(), want.size());
  for (size_t k = 0; k < got.size(); ++k) EXPECT_EQ(got[k], want[k]) << "at row " << k / ldy << " col " << k % ldy;
  for (int64_t c = 0; c < ldy; ++c) EXPECT_EQ(got[2 * ldy + c], y0[2 * ldy + c]) << "base row 2, col " << c;
  for (int64_t c = 8; c < 11; ++c) EXPECT_EQ(got[8 * ldy + c], y0[8 * ldy + c]) << "row 8 outside k's rows, col " << c;
  EXPECT_NE(got[0], y0[0]);
}
