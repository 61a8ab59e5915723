// The one-shot all-reduce over NVLink peer memory (runtime/comm/p2p_allreduce.h), through
// NcclCommunicator, under mpiexec -np 2 or 4 (one GPU per rank). Two communicators on the same
// GPUs: `one` (one-shot up to its threshold T, NCCL above) and `nccl` (NCCL only). For every call:
//  - up to T, the result equals bit for bit a host model of the kernel: the P ranks' values summed
//    in fp32 in rank order 0..P-1, rounded once to the dtype (round to nearest even). Every rank
//    can compute every rank's inputs (they come from (call, rank, index)), so every rank checks all
//    elements; an exact match on every rank is also the "bit-identical across ranks" property,
//    checked again directly by comparing a hash of the result bytes across ranks;
//  - the result agrees with NCCL's within the dtype's tolerance (below), and above T (where both
//    communicators take NCCL) with NCCL exactly.
// Cases: f32/bf16/f16; sizes 1, 7, 8, 9, 4097, decode sizes (4-48 KB) and sizes around T;
// tensors at unaligned addresses; 1000 back-to-back calls with changing data, sizes and dtypes
// (a rank sleeps now and then so the other runs ahead: catches flag/epoch races); the same inside
// a CUDA graph replayed 100 times with new inputs each time. Label `cuda`: with fewer visible GPUs
// than ranks every test is skipped, never passed.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "runtime/comm/nccl_communicator.h"
#include "runtime/comm/p2p_allreduce.h"

using namespace quilt;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

void ck(cudaError_t e, const char* what) { ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e); }

// ---- the host model ----------------------------------------------------------------------------

float to_f(DType dt, uint32_t bits) {
  switch (dt) {
    case DType::f32: {
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case DType::bf16: return bf16_to_f32(static_cast<uint16_t>(bits));
    case DType::f16: return f16_to_f32(static_cast<uint16_t>(bits));
    case DType::i32: break;
  }
  std::abort();
}
uint32_t from_f(DType dt, float f) {  // round to nearest even
  switch (dt) {
    case DType::f32: {
      uint32_t b;
      std::memcpy(&b, &f, 4);
      return b;
    }
    case DType::bf16: return f32_to_bf16(f);
    case DType::f16: {
      const __half h = __float2half_rn(f);
      uint16_t b;
      std::memcpy(&b, &h, 2);
      return b;
    }
    case DType::i32: break;
  }
  std::abort();
}

uint64_t mix(uint64_t z) {  // splitmix64
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Rank r's input element i of call `seed`, as dtype bits: uniform in [-1, 1) times 2^k, k in
// [-6, 6], so that sums round at many exponents (within f16's range for 8 ranks).
uint32_t input_bits(DType dt, uint64_t seed, int r, int64_t i) {
  const uint64_t h = mix(seed * 0x100000001b3ull ^ mix(static_cast<uint64_t>(r) << 48 ^ static_cast<uint64_t>(i)));
  const float u = static_cast<float>(h >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f;
  const int k = static_cast<int>((h >> 8) % 13) - 6;
  return from_f(dt, std::ldexp(u, k));
}

struct Call {
  DType dt = DType::bf16;
  int64_t n = 0;
  uint64_t seed = 0;
};

// The kernel's result (fp32 sum in rank order, one rounding), the exact sum and sum |v|.
void model(const Call& c, int P, int64_t i, uint32_t* want, double* exact, double* abs_sum) {
  float acc = 0.f;
  double e = 0, a = 0;
  for (int p = 0; p < P; ++p) {
    const float v = to_f(c.dt, input_bits(c.dt, c.seed, p, i));
    acc = p == 0 ? v : acc + v;
    e += v;
    a += std::abs(v);
  }
  *want = from_f(c.dt, acc);
  *exact = e;
  *abs_sum = a;
}

// |one-shot - NCCL| allowed for one element. NCCL adds in the dtype: P-1 roundings of partial sums,
// each at most half an ulp of a partial sum, |partial| <= S = sum |v|, half ulp <= 2^-(m+1) |x| with m
// mantissa bits (f32 23, bf16 7, f16 10); the one-shot rounds once (same bound) after an fp32 sum
// (P-1 roundings of at most 2^-24 S). So |one - nccl| <= P (2^-(m+1) + 2^-24) S, plus for f16 the
// subnormal spacing 2^-24 per rounding (2^-25 half-spacing, P of them).
double tolerance(DType dt, int P, double abs_sum) {
  const int m = dt == DType::f32 ? 23 : dt == DType::bf16 ? 7 : 10;
  const double floor = dt == DType::f16 ? P * std::ldexp(1.0, -25) : 0.0;
  return P * (std::ldexp(1.0, -(m + 1)) + std::ldexp(1.0, -24)) * abs_sum + floor;
}

uint64_t fnv(const void* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
  return h;
}

uint32_t get_bits(const std::vector<uint8_t>& bytes, DType dt, int64_t i) {
  if (dtype_size(dt) == 4) {
    uint32_t b;
    std::memcpy(&b, bytes.data() + 4 * i, 4);
    return b;
  }
  uint16_t b;
  std::memcpy(&b, bytes.data() + 2 * i, 2);
  return b;
}

std::vector<uint8_t> make_input(const Call& c, int r) {
  const size_t es = dtype_size(c.dt);
  std::vector<uint8_t> v(static_cast<size_t>(c.n) * es);
  for (int64_t i = 0; i < c.n; ++i) {
    const uint32_t b = input_bits(c.dt, c.seed, r, i);
    std::memcpy(v.data() + i * es, &b, es);
  }
  return v;
}

// Checks one result on this rank. exact_model: the one-shot path (must equal the host model bit for
// bit); otherwise NCCL's (within tolerance of the exact sum). nccl: NCCL's result for the same call
// (may be null), within tolerance. Returns the number of bad elements; appends a description of
// the first one to `where`.
struct Worst {
  double vs_nccl = 0, vs_exact = 0;
};
int64_t check_result(const Call& c, int P, const std::vector<uint8_t>& got, bool exact_model,
                     const std::vector<uint8_t>* nccl, std::string* where, Worst* worst) {
  int64_t bad = 0;
  for (int64_t i = 0; i < c.n; ++i) {
    uint32_t want = 0;
    double exact = 0, abs_sum = 0;
    model(c, P, i, &want, &exact, &abs_sum);
    const uint32_t g = get_bits(got, c.dt, i);
    const double gv = to_f(c.dt, g), tol = tolerance(c.dt, P, abs_sum);
    const double d_exact = std::abs(gv - exact);
    worst->vs_exact = std::max(worst->vs_exact, d_exact);
    bool ok = exact_model ? g == want : d_exact <= tol;
    double d_nccl = 0;
    if (nccl) {
      d_nccl = std::abs(gv - to_f(c.dt, get_bits(*nccl, c.dt, i)));
      worst->vs_nccl = std::max(worst->vs_nccl, d_nccl);
      ok = ok && d_nccl <= tol;
    }
    if (!ok && bad++ == 0) {
      char buf[320];
      std::snprintf(buf, sizeof(buf),
                    "%s n=%lld seed=%llu: first bad element %lld: got %.9g (bits %#x), model %.9g (bits %#x), exact "
                    "%.9g, nccl %.9g, tol %.3g",
                    dtype_name(c.dt), static_cast<long long>(c.n), static_cast<unsigned long long>(c.seed),
                    static_cast<long long>(i), gv, g, to_f(c.dt, want), want, exact,
                    nccl ? to_f(c.dt, get_bits(*nccl, c.dt, i)) : 0.0, tol);
      *where += buf;
    }
  }
  return bad;
}

// Whether every rank holds the same bytes.
bool same_on_every_rank(const std::vector<uint8_t>& bytes) {
  const unsigned long long h = fnv(bytes.data(), bytes.size());
  std::vector<unsigned long long> all(static_cast<size_t>(world_size()));
  MPI_Allgather(&h, 1, MPI_UNSIGNED_LONG_LONG, all.data(), 1, MPI_UNSIGNED_LONG_LONG, MPI_COMM_WORLD);
  return std::all_of(all.begin(), all.end(), [&](unsigned long long x) { return x == all[0]; });
}

// Every test ends with this: a failure on one rank must not leave the others in a collective.
int64_t agree_bad(int64_t bad) {
  long long mine = bad, total = 0;
  MPI_Allreduce(&mine, &total, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

class AllReduceCuda : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const int gpus = cuda_device_count();
    if (gpus < world_size()) return;
    be = make_backend("cuda", BackendOptions{DType::f32, world_rank() % gpus}).release();
    one = new NcclCommunicator(*be, MPI_COMM_WORLD);
    nccl = new NcclCommunicator(*be, MPI_COMM_WORLD, NcclOptions{0});
    // Every pair of the ranks' GPUs must reach each other for the one-shot path to be expected.
    peer_access = true;
    for (int a = 0; a < world_size(); ++a)
      for (int b = 0; b < world_size(); ++b) {
        int can = 0;
        if (a != b && (cudaDeviceCanAccessPeer(&can, a % gpus, b % gpus) != cudaSuccess || !can)) peer_access = false;
      }
    if (world_rank() == 0)
      std::printf("[allreduce] %d ranks on %s: one-shot threshold %lld bytes (0: off), peer access %s\n", world_size(),
                  cuda_device_name(*be).c_str(), static_cast<long long>(one->one_shot_max_bytes()),
                  peer_access ? "yes" : "no");
  }
  static void TearDownTestSuite() {
    delete one;
    delete nccl;
    delete be;
    one = nccl = nullptr;
    be = nullptr;
  }
  void SetUp() override {
    // Every rank sees the same devices, so every rank skips or none does.
    if (!be) {
      GTEST_SKIP() << "no CUDA device visible for each rank (" << cuda_device_count() << " for " << world_size()
                   << " ranks): the one-shot all-reduce was not run";
    }
    if (world_size() < 2) GTEST_SKIP() << "one rank: nothing to reduce";
    if (!peer_access) GTEST_SKIP() << "the GPUs cannot access each other as peers: the one-shot all-reduce was not run";
    ASSERT_GT(one->one_shot_max_bytes(), 0) << "peer access works but the one-shot path is off (see the log)";
    T = one->one_shot_max_bytes();
    stream = static_cast<cudaStream_t>(cuda_native_stream(*be));
  }

  // A device arena for tensors at chosen byte offsets (non-owning views).
  Tensor arena(size_t bytes) { return be->empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::f32); }
  static Tensor view(const Tensor& a, size_t offset, DType dt, int64_t n) {
    return Tensor(nullptr, static_cast<char*>(a.data()) + offset, dt, Device::cuda, {n});
  }
  void upload(Tensor& t, const std::vector<uint8_t>& v) {
    ck(cudaMemcpyAsync(t.data(), v.data(), v.size(), cudaMemcpyHostToDevice, stream), "upload");
    ck(cudaStreamSynchronize(stream), "upload sync");
  }
  std::vector<uint8_t> download(const Tensor& t) {
    std::vector<uint8_t> v(t.bytes());
    EXPECT_EQ(cudaMemcpyAsync(v.data(), t.data(), v.size(), cudaMemcpyDeviceToHost, stream), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << "a kernel failed";
    return v;
  }

  // One call on both communicators with the tensor at byte offset `misalign` from a 256-aligned
  // base; checks it and prints a line. Returns the bad elements on this rank.
  int64_t run_case(const Call& c, size_t misalign) {
    const size_t bytes = static_cast<size_t>(c.n) * dtype_size(c.dt);
    const auto in = make_input(c, world_rank());
    Tensor a1 = arena(bytes + misalign), a2 = arena(bytes + misalign);
    Tensor x1 = view(a1, misalign, c.dt, c.n), x2 = view(a2, misalign, c.dt, c.n);
    upload(x1, in);
    upload(x2, in);
    one->all_reduce_sum(x1);
    nccl->all_reduce_sum(x2);
    const auto g1 = download(x1), g2 = download(x2);
    const bool one_shot = static_cast<int64_t>(bytes) <= T;
    std::string where;
    Worst w;
    int64_t bad = check_result(c, world_size(), g1, one_shot, &g2, &where, &w);
    if (!one_shot && g1 != g2) {  // both took NCCL
      where += " [above the threshold, but differs from the NCCL-only communicator]";
      ++bad;
    }
    if (!same_on_every_rank(g1)) {
      where += " [result differs across ranks]";
      ++bad;
    }
    if (world_rank() == 0 || bad)
      std::printf("[allreduce] rank %d %-4s n=%-8lld %8zu B misalign %zu %-8s: max |got - exact| %.3g, max |got - nccl| "
                  "%.3g%s%s\n",
                  world_rank(), dtype_name(c.dt), static_cast<long long>(c.n), bytes, misalign,
                  one_shot ? "one-shot" : "nccl", w.vs_exact, w.vs_nccl, bad ? "  BAD: " : "", where.c_str());
    std::fflush(stdout);
    return bad;
  }

  static Backend* be;
  static NcclCommunicator* one;
  static NcclCommunicator* nccl;
  static bool peer_access;
  int64_t T = 0;
  cudaStream_t stream = nullptr;
};
Backend* AllReduceCuda::be = nullptr;
NcclCommunicator* AllReduceCuda::one = nullptr;
NcclCommunicator* AllReduceCuda::nccl = nullptr;
bool AllReduceCuda::peer_access = false;

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

}  // namespace

TEST_F(AllReduceCuda, MatchesModelAndNcclAcrossSizes) {
  int64_t bad = 0;
  uint64_t seed = 1;
  for (DType dt : kDtypes) {
    const int64_t es = static_cast<int64_t>(dtype_size(dt)), t = T / es;
    // Odd sizes, gemma-2b/7b decode rows (2048, 3072 x batch 1..8), and around the threshold.
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{127}, int64_t{2048}, int64_t{3072},
                      int64_t{4097}, int64_t{8 * 3072}, int64_t{65537}, t - 1, t, t + 1, 3 * t + 5})
      bad += run_case(Call{dt, n, seed++}, 0);
  }
  EXPECT_EQ(agree_bad(bad), 0) << "bad elements over all ranks (rank lines above)";
}

TEST_F(AllReduceCuda, UnalignedTensors) {
  int64_t bad = 0;
  uint64_t seed = 100;
  for (DType dt : kDtypes)
    for (size_t misalign : {dtype_size(dt), 3 * dtype_size(dt), size_t{8}})
      for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4097}, int64_t{65537}})
        bad += run_case(Call{dt, n, seed++}, misalign);
  EXPECT_EQ(agree_bad(bad), 0) << "bad elements over all ranks (rank lines above)";
}

// 1000 calls enqueued back to back, each on its own tensor (so all can be checked at the end),
// sizes and dtypes changing every call (so the grid changes), a few above the threshold (NCCL in
// between), every 7th tensor unaligned. Every 10th call, the last rank sleeps 200 us before
// enqueueing: the others run ahead and wait on its flags.
TEST_F(AllReduceCuda, ThousandBackToBackCalls) {
  const int64_t sizes[] = {2048, 1, 3072, 7, 4097, 24576, 16384, 9, 65537, 2048 * 8};
  std::vector<Call> calls;
  std::vector<size_t> offsets;
  size_t total = 0;
  for (int k = 0; k < 1000; ++k) {
    Call c;
    c.dt = kDtypes[k % 3];
    const int64_t es = static_cast<int64_t>(dtype_size(c.dt));
    c.n = k % 97 == 50 ? T / es + 1 + k % 5 : k % 89 == 3 ? T / es : sizes[k % 10];
    c.seed = 1000 + k;
    total = (total + 255) / 256 * 256 + (k % 7 == 3 ? dtype_size(c.dt) : 0);
    offsets.push_back(total);
    total += static_cast<size_t>(c.n) * dtype_size(c.dt);
    calls.push_back(c);
  }
  Tensor a = arena(total);
  std::vector<uint8_t> host(total);
  for (size_t k = 0; k < calls.size(); ++k) {
    const auto in = make_input(calls[k], world_rank());
    std::memcpy(host.data() + offsets[k], in.data(), in.size());
  }
  ck(cudaMemcpyAsync(a.data(), host.data(), total, cudaMemcpyHostToDevice, stream), "upload");
  ck(cudaStreamSynchronize(stream), "upload sync");
  MPI_Barrier(MPI_COMM_WORLD);
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t k = 0; k < calls.size(); ++k) {
    if (k % 10 == 5 && world_rank() == world_size() - 1) std::this_thread::sleep_for(std::chrono::microseconds(200));
    Tensor x = view(a, offsets[k], calls[k].dt, calls[k].n);
    one->all_reduce_sum(x);
  }
  ck(cudaStreamSynchronize(stream), "1000 calls");
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ck(cudaMemcpy(host.data(), a.data(), total, cudaMemcpyDeviceToHost), "download");
  int64_t bad = 0, bad_calls = 0;
  std::string first;
  for (size_t k = 0; k < calls.size(); ++k) {
    const Call& c = calls[k];
    const size_t bytes = static_cast<size_t>(c.n) * dtype_size(c.dt);
    const std::vector<uint8_t> got(host.begin() + offsets[k], host.begin() + offsets[k] + bytes);
    std::string where;
    Worst w;
    const int64_t b = check_result(c, world_size(), got, static_cast<int64_t>(bytes) <= T, nullptr, &where, &w);
    if (b && bad_calls++ == 0) first = "call " + std::to_string(k) + ": " + where;
    bad += b;
  }
  const bool same = same_on_every_rank(host);
  if (world_rank() == 0 || bad || !same)
    std::printf("[allreduce] rank %d: 1000 back-to-back calls in %.2f ms: %lld bad elements in %lld calls%s%s%s\n",
                world_rank(), ms, static_cast<long long>(bad), static_cast<long long>(bad_calls),
                same ? "" : " [results differ across ranks]", first.empty() ? "" : "; first: ", first.c_str());
  std::fflush(stdout);
  EXPECT_EQ(agree_bad(bad + (same ? 0 : 1)), 0) << "bad elements over all ranks (rank lines above)";
}

// Decode-like: a graph with 6 all-reduces (copy in from a source buffer, then reduce in place),
// replayed 100 times with new sources each time, the last rank sleeping before some launches; then
// eager calls again (the epoch in device memory carries over between graph and eager calls).
TEST_F(AllReduceCuda, InsideCudaGraphReplayed100Times) {
  const std::vector<std::pair<DType, int64_t>> shapes = {
      {DType::bf16, 2048}, {DType::bf16, 3072 * 8}, {DType::f16, 4097}, {DType::f32, 7}, {DType::bf16, 1}, {DType::f32, 65537}};
  std::vector<Tensor> src, dst;
  for (const auto& [dt, n] : shapes) {
    src.push_back(be->empty({n}, dt));
    dst.push_back(be->empty({n}, dt));
  }
  auto body = [&]() {
    for (size_t j = 0; j < shapes.size(); ++j) {
      ASSERT_EQ(cudaMemcpyAsync(dst[j].data(), src[j].data(), dst[j].bytes(), cudaMemcpyDeviceToDevice, stream),
                cudaSuccess);
      one->all_reduce_sum(dst[j]);
    }
  };
  auto fill = [&](uint64_t round) {
    std::vector<Call> cs;
    for (size_t j = 0; j < shapes.size(); ++j) {
      Call c{shapes[j].first, shapes[j].second, 5000 + round * 16 + j};
      upload(src[j], make_input(c, world_rank()));
      cs.push_back(c);
    }
    return cs;
  };
  auto check = [&](const std::vector<Call>& cs, const char* what, uint64_t round, std::string* first) {
    int64_t bad = 0;
    for (size_t j = 0; j < shapes.size(); ++j) {
      std::string where;
      Worst w;
      const int64_t b = check_result(cs[j], world_size(), download(dst[j]), true, nullptr, &where, &w);
      if (b && first->empty()) *first = std::string(what) + " round " + std::to_string(round) + ": " + where;
      bad += b;
    }
    return bad;
  };
  int64_t bad = 0;
  std::string first;
  // Eagerly once (as a model step runs before its graph is recorded).
  auto cs = fill(0);
  body();
  bad += check(cs, "eager", 0, &first);
  auto graph = be->capture_graph(body);
  const auto t0 = std::chrono::steady_clock::now();
  for (uint64_t round = 1; round <= 100; ++round) {
    cs = fill(round);
    if (round % 3 == 0 && world_rank() == world_size() - 1) std::this_thread::sleep_for(std::chrono::microseconds(300));
    graph->launch();
    bad += check(cs, "replay", round, &first);
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  for (uint64_t round = 101; round <= 103; ++round) {
    cs = fill(round);
    body();
    bad += check(cs, "eager after replays", round, &first);
  }
  if (world_rank() == 0 || bad)
    std::printf("[allreduce] rank %d: graph of %zu all-reduces replayed 100 times (%.1f ms with uploads and checks): %lld "
                "bad elements%s%s\n",
                world_rank(), shapes.size(), ms, static_cast<long long>(bad), first.empty() ? "" : "; first: ",
                first.c_str());
  std::fflush(stdout);
  EXPECT_EQ(agree_bad(bad), 0) << "bad elements over all ranks (rank lines above)";
}
