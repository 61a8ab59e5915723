// Sampling on the GPU, the same semantics as the CPU reference (cpu/sample.cpp): only the chosen
// ids and the asked-for logprobs come back to the host.
//
// Two kernels:
//  1. stats (grid: slot x chunk of 2048 columns): each block loads its chunk of a row as fp32,
//     applies that row's penalties (the sparse list) and, for sampling rows, the temperature,
//     writes the processed chunk to the row's work buffer (only rows that sample or report
//     alternatives have one) and leaves (max, first argmax, sum exp(x - max)) per chunk.
//  2. choose (one block of 1024 threads per slot): folds the chunk stats into the row's argmax and
//     log-sum-exp. Greedy rows and logprob targets end there (greedy rows never sort). Sampling
//     rows then run the warpers on their work row, each a threshold search instead of a sort:
//     a 3-level radix select (11/11/10 bits of an order-preserving key) over per-bucket weights,
//     counts for top-k and top-n, probability mass for top-p and typical-p; the ties at the
//     threshold are cut in id order (the CPU sorts ties by id). The draw finds the first id whose
//     cumulative probability, in id order, passes u = uniform_from(seed, draw), as the CPU does.
// Masses are fixed-point integers (p * 2^31, rounded: a row's total stays below 2^32, so the
// histograms use native 32-bit shared atomics), so every histogram, scan and sum of mass is exact
// and order-free: identical inputs give identical outputs on every rank, with no float atomics.
// (Rounding each p to 2^-32 moves a 256k-token cumulative sum by ~1e-7 at most typically, the
// size of the fp32 error of p itself.) Float sums (log-sum-exp, entropy) are fixed-order tree
// reductions in double.
// The CPU computes each p in double; here p = expf(float(x - lse)), ~1e-6 relative, so a token
// can differ from the CPU's only where u (or top_p, typical_p) falls within ~1e-6 of a
// cumulative-mass boundary.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstring>

#include "kernels/cuda/ops.h"
#include "kernels/sample_checks.h"

namespace quilt::cuda {
namespace {

using u64 = unsigned long long;

constexpr int kChunk = 2048;       // columns per stats block
constexpr int kStatThreads = 256;  // threads per stats block
constexpr int kThreads = 1024;     // threads per choose block (two radix buckets per thread)
constexpr int kBuckets = 2048;     // radix buckets of the widest level (11 bits)
constexpr int kMaxTopN = 1024;     // alternatives per row (one candidate slot per thread)
constexpr float kOne = 0x1p31f;    // fixed-point unit of probability mass

// A batch row as the kernels read it (filled on the host, uploaded with the batch).
struct DevRow {
  uint64_t seed, draw;
  int32_t row, work;  // logits row; work row (-1: none)
  int32_t top_k, top_n, alt;  // top_n clipped to V; alt: first alternative slot of the result
  int32_t pen_begin, pen_count;
  int32_t sampling;
  float temperature, top_p, typical_p, rep, freq, pres;
};

struct Part {  // one chunk of one slot
  float m;     // max of the processed chunk
  int32_t arg; // first column holding it
  double s;    // sum of exp(x - m) over the chunk
};

struct Shared {
  unsigned int hist[kBuckets];  // per-bucket weight: < 2^32 (counts <= V, masses <= 2^31 + rounding)
  uint32_t ck[kMaxTopN];
  int32_t cid[kMaxTopN];
  u64 red_u[32];
  double red_d[32];
  float red_f[32];
  int red_i[32];
  int cnt, sel_bucket;
  u64 sel_above, sel_weight;
};

// Order-preserving key of a float (larger float, larger key); -0 and +0 share one key.
__device__ __forceinline__ uint32_t fkey(float x) {
  const uint32_t b = __float_as_uint(__fadd_rn(x, 0.0f));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// exp(x - lse) as fixed-point mass; 0 for masked (-inf) columns.
__device__ __forceinline__ u64 mass(float x, double lse) {
  if (x == -INFINITY) return 0;
  const float e = expf(static_cast<float>(static_cast<double>(x) - lse));
  return __float2uint_rn(e * kOne);
}

// ---- block primitives (every thread of the block calls them; results reach every thread) ----

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // `red` may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = red[0];
  for (int w = 1; w < warps; ++w) r = op(r, red[w]);  // the same order in every thread
  return r;
}
struct MaxF { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct MinI { __device__ int operator()(int a, int b) const { return a < b ? a : b; } };
struct MaxI { __device__ int operator()(int a, int b) const { return a > b ? a : b; } };
struct SumD { __device__ double operator()(double a, double b) const { return a + b; } };

// Inclusive prefix sum over the block in thread order; `total` gets the block's sum.
__device__ u64 block_scan(u64 v, u64* red, u64& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) red[warp] = v;
  __syncthreads();
  u64 before = 0, all = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += red[w];
    all += red[w];
  }
  total = all;
  return v + before;
}

// log-sum-exp from per-thread online (max, sum) pairs.
__device__ double block_lse(float m, double s, Shared& sm) {
  const float M = block_reduce(m, MaxF{}, sm.red_f);
  const double t = m == -INFINITY ? 0.0 : s * exp(static_cast<double>(m) - static_cast<double>(M));
  const double S = block_reduce(t, SumD{}, sm.red_d);
  return static_cast<double>(M) + log(S);
}

__device__ __forceinline__ void online(float x, float& m, double& s) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * static_cast<double>(expf(m - x)) + 1.0;
    m = x;
  } else {
    s += static_cast<double>(expf(x - m));
  }
}

// Masks (to -inf) the columns that `keep` rejects and returns the log-sum-exp of the rest.
template <typename Keep>
__device__ double mask_and_lse(float* x, int V, Keep keep, Shared& sm) {
  float m = -INFINITY;
  double s = 0;
  for (int v = threadIdx.x; v < V; v += blockDim.x) {
    const float xv = x[v];
    if (!keep(v, xv)) {
      if (xv != -INFINITY) x[v] = -INFINITY;
      continue;
    }
    online(xv, m, s);
  }
  return block_lse(m, s, sm);  // its barriers publish the writes to the block
}

// Radix select over keys (larger key = earlier in the order) weighted by weight(v, key): finds
// the key t where the cumulative weight, from the largest key down, first reaches `need`.
// Returns false (every thread) when the total weight is below need. above = weight of keys > t,
// tie = weight of key t.
template <typename Key, typename Weight>
__device__ bool radix_select(int V, u64 need, Key key, Weight weight, Shared& sm, uint32_t& t, u64& above,
                             u64& tie) {
  const int tid = threadIdx.x;
  uint32_t prefix = 0, pmask = 0;
  u64 ab = 0, bw = 0;
  for (int lv = 0; lv < 3; ++lv) {
    const int sh = lv == 0 ? 21 : lv == 1 ? 10 : 0;
    const int nb = lv == 2 ? 1024 : 2048;
    for (int i = tid; i < kBuckets; i += blockDim.x) sm.hist[i] = 0;
    if (tid == 0) sm.sel_bucket = -1;
    __syncthreads();
    for (int v = tid; v < V; v += blockDim.x) {
      const uint32_t k = key(v);
      if ((k & pmask) != prefix) continue;
      const u64 w = weight(v, k);
      if (w) atomicAdd(&sm.hist[(k >> sh) & (nb - 1)], static_cast<unsigned int>(w));
    }
    __syncthreads();
    // Thread i holds buckets nb-1-2i and nb-2-2i: the scan runs from the largest key down.
    const int b0 = nb - 1 - 2 * tid, b1 = b0 - 1;
    const u64 h0 = b0 >= 0 ? sm.hist[b0] : 0, h1 = b1 >= 0 ? sm.hist[b1] : 0;
    u64 total;
    const u64 incl = block_scan(h0 + h1, sm.red_u, total), excl = incl - h0 - h1;
    if (b0 >= 0 && ab + excl < need && need <= ab + excl + h0) {
      sm.sel_bucket = b0;
      sm.sel_above = ab + excl;
      sm.sel_weight = h0;
    } else if (b1 >= 0 && ab + excl + h0 < need && need <= ab + incl) {
      sm.sel_bucket = b1;
      sm.sel_above = ab + excl + h0;
      sm.sel_weight = h1;
    }
    __syncthreads();
    const int b = sm.sel_bucket;
    const u64 sa = sm.sel_above, sw = sm.sel_weight;
    __syncthreads();  // everyone has read sel_* before the next level rewrites them
    if (b < 0) return false;
    prefix |= static_cast<uint32_t>(b) << sh;
    pmask |= static_cast<uint32_t>(nb - 1) << sh;
    ab = sa;
    bw = sw;
  }
  t = prefix;
  above = ab;
  tie = bw;
  return true;
}

// The first column v, in id order, whose cumulative weight (base + weights of columns <= v)
// reaches `need`; INT_MAX when none does. Each thread owns a contiguous range of ids.
template <typename Weight>
__device__ int find_crossing(int V, u64 base, u64 need, Weight weight, Shared& sm) {
  const int per = (V + blockDim.x - 1) / blockDim.x;
  const int lo = min(V, static_cast<int>(threadIdx.x) * per), hi = min(V, lo + per);
  u64 s = 0;
  for (int v = lo; v < hi; ++v) s += weight(v);
  u64 total;
  const u64 incl = block_scan(s, sm.red_u, total), excl = incl - s;
  int found = INT_MAX;
  if (base + excl < need && need <= base + incl) {
    u64 c = base + excl;
    for (int v = lo; v < hi; ++v) {
      const u64 w = weight(v);
      c += w;
      if (w > 0 && c >= need) {
        found = v;
        break;
      }
    }
  }
  return block_reduce(found, MinI{}, sm.red_i);
}

// The n best columns of x (value descending, ties by id) with logprob x - lse, best first.
__device__ void top_n(const float* x, int V, int n, double lse, int32_t* out_id, float* out_lp, Shared& sm) {
  const int tid = threadIdx.x;
  uint32_t t;
  u64 above, tie;
  auto key = [&](int v) { return fkey(x[v]); };
  radix_select(V, static_cast<u64>(n), key, [](int, uint32_t) { return 1ull; }, sm, t, above, tie);
  // Every column with key >= t fits the candidate slots, or the ties are cut at the n-th in id order.
  int cut = INT_MAX;
  if (above + tie > static_cast<u64>(kMaxTopN))
    cut = find_crossing(V, above, static_cast<u64>(n), [&](int v) { return key(v) == t ? 1ull : 0ull; }, sm);
  if (tid == 0) sm.cnt = 0;
  __syncthreads();
  for (int v = tid; v < V; v += blockDim.x) {
    const uint32_t k = key(v);
    if (k > t || (k == t && v <= cut)) {
      const int slot = atomicAdd(&sm.cnt, 1);  // any order: the ranks below sort them
      sm.ck[slot] = k;
      sm.cid[slot] = v;
    }
  }
  __syncthreads();
  const int cnt = sm.cnt;
  for (int i = tid; i < cnt; i += blockDim.x) {
    const uint32_t ki = sm.ck[i];
    const int vi = sm.cid[i];
    int rank = 0;
    for (int j = 0; j < cnt; ++j) rank += sm.ck[j] > ki || (sm.ck[j] == ki && sm.cid[j] < vi);
    if (rank < n) {
      out_id[rank] = vi;
      out_lp[rank] = static_cast<float>(static_cast<double>(x[vi]) - lse);
    }
  }
  __syncthreads();
}

// ---- kernels -----------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kStatThreads)
sample_stats_kernel(const T* __restrict__ logits,        // [P, M, Vr]
                    int64_t M, int64_t Vr, int V,
                    const DevRow* __restrict__ rows,     // [R]
                    int R,
                    const LogprobTarget* __restrict__ targets,  // [slots - R]
                    const SamplePenalty* __restrict__ pen,
                    float* __restrict__ work,            // [W, V]
                    Part* __restrict__ parts,            // [slots, C]
                    int C) {
  __shared__ float xs[kChunk];
  __shared__ float red_f[32];
  __shared__ int red_i[32];
  __shared__ double red_d[32];
  const int slot = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x;
  const bool is_row = slot < R;
  const int64_t r = is_row ? rows[slot].row : targets[slot - R].row;
  const int v0 = chunk * kChunk, n = min(kChunk, V - v0);
  const int vr = static_cast<int>(Vr);
  for (int i = tid; i < n; i += blockDim.x) {
    const int v = v0 + i, p = v / vr, j = v - p * vr;
    xs[i] = to_f(logits[(static_cast<int64_t>(p) * M + r) * Vr + j]);
  }
  __syncthreads();
  if (is_row) {
    const DevRow& rw = rows[slot];
    const bool do_rep = rw.rep != 1.0f, do_fp = rw.freq != 0.0f || rw.pres != 0.0f;
    if (do_rep || do_fp) {
      // Ids are distinct within a row, so each column has at most one writer.
      for (int e = tid; e < rw.pen_count; e += blockDim.x) {
        const SamplePenalty q = pen[rw.pen_begin + e];
        if (q.id < v0 || q.id >= v0 + n) continue;
        float s = xs[q.id - v0];
        // Explicit roundings: no FMA contraction, as the CPU computes it.
        if (do_rep && q.seen > 0) s = s > 0 ? __fdiv_rn(s, rw.rep) : __fmul_rn(s, rw.rep);
        if (do_fp && q.generated > 0)
          s = __fsub_rn(s, __fadd_rn(__fmul_rn(rw.freq, static_cast<float>(q.generated)), rw.pres));
        xs[q.id - v0] = s;
      }
      __syncthreads();
    }
    if (rw.sampling && rw.temperature != 1.0f)
      for (int i = tid; i < n; i += blockDim.x) xs[i] = __fdiv_rn(xs[i], rw.temperature);
    if (rw.work >= 0) {
      float* w = work + static_cast<int64_t>(rw.work) * V + v0;
      for (int i = tid; i < n; i += blockDim.x) w[i] = xs[i];
    }
  }
  float m = -INFINITY;
  int a = INT_MAX;
  for (int i = tid; i < n; i += blockDim.x)
    if (xs[i] > m) m = xs[i], a = i;
  const float bm = block_reduce(m, MaxF{}, red_f);
  const int ba = block_reduce(m == bm ? a : INT_MAX, MinI{}, red_i);
  double s = 0;
  for (int i = tid; i < n; i += blockDim.x) s += static_cast<double>(expf(xs[i] - bm));
  const double bs = block_reduce(s, SumD{}, red_d);
  if (tid == 0) parts[static_cast<int64_t>(slot) * C + chunk] = Part{bm, v0 + ba, bs};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sample_choose_kernel(const T* __restrict__ logits,  // [P, M, Vr]
                     int64_t M, int64_t Vr, int V,
                     const DevRow* __restrict__ rows, int R,
                     const LogprobTarget* __restrict__ targets,
                     float* __restrict__ work,      // [W, V]
                     const Part* __restrict__ parts, int C,
                     uint32_t* __restrict__ res,    // [2 R + 2 A + targets]
                     int A) {
  __shared__ Shared sm;
  const int slot = blockIdx.x, tid = threadIdx.x;
  // Fold the chunk stats: max, its first column, log-sum-exp of the processed row.
  float m = -INFINITY;
  int a = INT_MAX;
  double s = 0;
  for (int c = tid; c < C; c += blockDim.x) {  // ascending chunks: ties keep the earlier column
    const Part p = parts[static_cast<int64_t>(slot) * C + c];
    if (p.m > m) {
      s = (m == -INFINITY ? 0.0 : s * exp(static_cast<double>(m) - static_cast<double>(p.m))) + p.s;
      m = p.m;
      a = p.arg;
    } else if (p.m != -INFINITY) {
      s += p.s * exp(static_cast<double>(p.m) - static_cast<double>(m));
    }
  }
  const float bm = block_reduce(m, MaxF{}, sm.red_f);
  const int arg = block_reduce(m == bm ? a : INT_MAX, MinI{}, sm.red_i);
  const double ts = m == -INFINITY ? 0.0 : s * exp(static_cast<double>(m) - static_cast<double>(bm));
  double lse = static_cast<double>(bm) + log(block_reduce(ts, SumD{}, sm.red_d));

  int32_t* res_id = reinterpret_cast<int32_t*>(res);
  float* res_lp = reinterpret_cast<float*>(res + R);
  int32_t* alt_id = reinterpret_cast<int32_t*>(res + 2 * R);
  float* alt_lp = reinterpret_cast<float*>(res + 2 * R + A);
  float* tgt_lp = reinterpret_cast<float*>(res + 2 * R + 2 * A);

  if (slot >= R) {  // a prompt-logprob target: log_softmax of the raw row
    if (tid == 0) {
      const LogprobTarget t = targets[slot - R];
      const int vr = static_cast<int>(Vr), p = t.id / vr, j = t.id - p * vr;
      const float x = to_f(logits[(static_cast<int64_t>(p) * M + t.row) * Vr + j]);
      tgt_lp[slot - R] = static_cast<float>(static_cast<double>(x) - lse);
    }
    return;
  }
  const DevRow rw = rows[slot];
  if (!rw.sampling) {
    if (tid == 0) {
      res_id[slot] = arg;
      res_lp[slot] = static_cast<float>(static_cast<double>(bm) - lse);
    }
    if (rw.top_n > 0) top_n(work + static_cast<int64_t>(rw.work) * V, V, rw.top_n, lse, alt_id + rw.alt, alt_lp + rw.alt, sm);
    return;
  }

  float* x = work + static_cast<int64_t>(rw.work) * V;
  auto key = [&](int v) { return fkey(x[v]); };
  uint32_t t;
  u64 above, tie;
  if (rw.top_k > 0 && rw.top_k < V) {
    radix_select(V, static_cast<u64>(rw.top_k), key, [](int, uint32_t) { return 1ull; }, sm, t, above, tie);
    const uint32_t kth = t;
    lse = mask_and_lse(x, V, [&](int, float xv) { return fkey(xv) >= kth; }, sm);  // HF keeps ties
  }
  if (rw.top_p < 1.0f) {
    const double l0 = lse;
    const u64 need = max(1ull, static_cast<u64>(__float2ull_rn(rw.top_p * kOne)));
    if (radix_select(V, need, key, [&](int v, uint32_t) { return mass(x[v], l0); }, sm, t, above, tie)) {
      const uint32_t tt = t;
      const int cut = find_crossing(V, above, need, [&](int v) {
        const float xv = x[v];
        return fkey(xv) == tt ? mass(xv, l0) : 0ull;
      }, sm);
      lse = mask_and_lse(x, V, [&](int v, float xv) {
        const uint32_t k = fkey(xv);
        return k > tt || (k == tt && v <= cut);
      }, sm);
    }
  }
  if (rw.typical_p < 1.0f) {
    const double l0 = lse;
    double h = 0;
    for (int v = tid; v < V; v += blockDim.x) {
      const float xv = x[v];
      if (xv == -INFINITY) continue;
      const double lp = static_cast<double>(xv) - l0;
      h -= static_cast<double>(expf(static_cast<float>(lp))) * lp;
    }
    const double H = block_reduce(h, SumD{}, sm.red_d);
    // Smaller |-lp - H| first: the key reverses the bits of the non-negative float; masked: 0, last.
    auto tkey = [=](float xv) -> uint32_t {
      if (xv == -INFINITY) return 0u;
      const double lp = static_cast<double>(xv) - l0;
      return ~__float_as_uint(static_cast<float>(fabs(-lp - H)));
    };
    const u64 need = max(1ull, static_cast<u64>(__float2ull_rn(rw.typical_p * kOne)));
    if (radix_select(V, need, [&](int v) { return tkey(x[v]); },
                     [&](int v, uint32_t k) { return k ? mass(x[v], l0) : 0ull; }, sm, t, above, tie)) {
      const uint32_t tt = t;
      const int cut = find_crossing(V, above, need, [&](int v) {
        const float xv = x[v];
        return tkey(xv) == tt ? mass(xv, l0) : 0ull;
      }, sm);
      lse = mask_and_lse(x, V, [&](int v, float xv) {
        const uint32_t k = tkey(xv);
        return k > tt || (k == tt && v <= cut);
      }, sm);
    }
  }
  // The draw: the first id whose cumulative probability (in id order) exceeds u.
  const double u = uniform_from(rw.seed, rw.draw);
  const u64 need = __double2ull_rz(u * static_cast<double>(kOne)) + 1;
  const double l1 = lse;
  int id = find_crossing(V, 0, need, [&](int v) { return mass(x[v], l1); }, sm);
  if (id == INT_MAX) {  // u past the whole (rounded) mass: the last unmasked id, as the CPU
    int last = -1;
    for (int v = tid; v < V; v += blockDim.x)
      if (x[v] != -INFINITY) last = v;
    id = block_reduce(last, MaxI{}, sm.red_i);
  }
  if (tid == 0) {
    res_id[slot] = id;
    res_lp[slot] = static_cast<float>(static_cast<double>(x[id]) - l1);
  }
  if (rw.top_n > 0) top_n(x, V, rw.top_n, l1, alt_id + rw.alt, alt_lp + rw.alt, sm);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

void sample(Context& c, SampleResult& out, const Tensor& logits, const SampleBatch& batch) {
  QUILT_ASSERT(logits.device() == Device::cuda && logits.dtype() != DType::i32, "sample: logits ", logits.describe());
  const SampleLayout L = check_sample_batch(logits, batch);
  const int R = static_cast<int>(batch.rows.size()), NT = static_cast<int>(batch.targets.size());
  const int V = static_cast<int>(L.vocab);
  out.tokens.assign(R, SampledToken{});
  out.target_logprobs.assign(NT, 0.0f);
  if (R + NT == 0) return;
  const int C = (V + kChunk - 1) / kChunk;
  QUILT_REQUIRE(C <= 65535, "sample: vocab ", V, " too large for the cuda sampler");

  // Rows as the kernels read them; work rows only for rows that sample or report alternatives.
  std::vector<DevRow> rows(R);
  int W = 0, A = 0;
  for (int i = 0; i < R; ++i) {
    const SampleRow& s = batch.rows[i];
    QUILT_REQUIRE(s.top_n <= kMaxTopN, "sample: row ", i, " asks for ", s.top_n,
                  " alternatives; the cuda sampler returns at most ", kMaxTopN);
    DevRow& d = rows[i];
    d.seed = s.seed;
    d.draw = s.draw;
    d.row = s.row;
    d.sampling = s.sampling() ? 1 : 0;
    d.top_n = std::min(s.top_n, V);
    d.work = d.sampling || d.top_n > 0 ? W++ : -1;
    d.alt = A;
    A += d.top_n;
    d.top_k = s.top_k;
    d.pen_begin = s.penalty_begin;
    d.pen_count = s.penalty_count;
    d.temperature = s.temperature;
    d.top_p = s.top_p;
    d.typical_p = s.typical_p;
    d.rep = s.repetition_penalty;
    d.freq = s.frequency_penalty;
    d.pres = s.presence_penalty;
  }

  // One upload: [rows][targets][penalties]; scratch: that, then chunk stats, result, work rows.
  const size_t rows_b = R * sizeof(DevRow), tgt_off = align256(rows_b), tgt_b = NT * sizeof(LogprobTarget);
  const size_t pen_off = align256(tgt_off + tgt_b), pen_b = batch.penalties.size() * sizeof(SamplePenalty);
  const size_t params_b = pen_off + pen_b;
  const size_t parts_off = align256(params_b), parts_b = static_cast<size_t>(R + NT) * C * sizeof(Part);
  const size_t res_off = align256(parts_off + parts_b), res_b = static_cast<size_t>(2 * R + 2 * A + NT) * 4;
  const size_t work_off = align256(res_off + res_b), work_b = static_cast<size_t>(W) * V * sizeof(float);
  char* dev = static_cast<char*>(c.scratch(work_off + work_b, "sample"));

  // Pinned staging, as the backend's uploads: wait only when the ring is full.
  char* staged = c.staging(params_b, "sample: upload");
  if (rows_b) std::memcpy(staged, rows.data(), rows_b);
  if (tgt_b) std::memcpy(staged + tgt_off, batch.targets.data(), tgt_b);
  if (pen_b) std::memcpy(staged + pen_off, batch.penalties.data(), pen_b);
  c.upload_staged(dev, staged, params_b, "sample: upload");

  const auto* d_rows = reinterpret_cast<const DevRow*>(dev);
  const auto* d_tgt = reinterpret_cast<const LogprobTarget*>(dev + tgt_off);
  const auto* d_pen = reinterpret_cast<const SamplePenalty*>(dev + pen_off);
  auto* d_parts = reinterpret_cast<Part*>(dev + parts_off);
  auto* d_res = reinterpret_cast<uint32_t*>(dev + res_off);
  auto* d_work = reinterpret_cast<float*>(dev + work_off);
  dispatch(logits.dtype(), "sample", [&](auto tag) {
    using T = decltype(tag);
    sample_stats_kernel<T><<<dim3(R + NT, C), kStatThreads, 0, c.stream>>>(
        logits.as<T>(), L.rows, L.shard_vocab, V, d_rows, R, d_tgt, d_pen, d_work, d_parts, C);
    check_launch("sample: stats");
    sample_choose_kernel<T><<<R + NT, kThreads, 0, c.stream>>>(logits.as<T>(), L.rows, L.shard_vocab, V, d_rows, R,
                                                               d_tgt, d_work, d_parts, C, d_res, A);
    check_launch("sample: choose");
  });

  // The one download, into pinned staging.
  if (res_b > c.down_bytes) {
    check(cudaFreeHost(c.down_host), "sample: staging");
    c.down_host = nullptr;
    c.down_bytes = 0;
    check(cudaMallocHost(&c.down_host, res_b), "sample: staging");
    c.down_bytes = res_b;
  }
  check(cudaMemcpyAsync(c.down_host, d_res, res_b, cudaMemcpyDeviceToHost, c.stream), "sample: download");
  check(cudaStreamSynchronize(c.stream), "sample");
  c.up_used = 0;  // every staged upload has landed
  const auto* h = static_cast<const uint32_t*>(c.down_host);
  auto word_f = [&](size_t i) {
    float f;
    std::memcpy(&f, h + i, 4);
    return f;
  };
  for (int i = 0; i < R; ++i) {
    SampledToken& t = out.tokens[i];
    t.id = static_cast<int32_t>(h[i]);
    t.logprob = word_f(R + i);
    for (int k = 0; k < rows[i].top_n; ++k)
      t.alternatives.push_back({static_cast<int32_t>(h[2 * R + rows[i].alt + k]), word_f(2 * R + A + rows[i].alt + k)});
  }
  for (int i = 0; i < NT; ++i) out.target_logprobs[i] = word_f(2 * R + 2 * A + i);
}

}  // namespace quilt::cuda
