// Sampling on the GPU, the same semantics as the CPU reference (cpu/sample.cpp): only the chosen
// ids and the asked-for logprobs come back to the host.
//
// Two kernels (plus one upload and one download):
//  1. stats (grid: slot x chunk of 2048 columns, slot = batch row or logprob target): each block
//     loads its chunk as fp32, applies the row's penalties (the sparse list) and, for sampling rows,
//     the temperature, writes the processed chunk to the row's work row (only rows that sample or
//     report alternatives have one) and leaves (max, first argmax, sum exp(x - max), and the sum of
//     exp(x - max) (x - max) for the entropy) per chunk. The last block of a slot to finish (an
//     atomic count) folds them: greedy rows and targets get their result there, other rows a summary
//     (max M, log-sum-exp, entropy) for kernel 2.
//  2. select (G blocks of 512 threads per row that samples or reports alternatives; G fills the
//     GPU: 125 blocks of 2048 columns at batch 1, 8 of 32000 at batch 32, one block per row when
//     the batch alone fills the GPU). Each block keeps its part of the work row in shared memory
//     (the rest is re-read from the work row) and the blocks of a row meet at barriers (an atomic
//     count per row; the launch is cooperative, so the G blocks are resident together). The warpers
//     (top-k, top-p, typical-p, in that order) are threshold searches instead of a sort: a radix
//     select over an order-preserving 32-bit key (11/11/10 bits) with per-bucket weights: counts
//     for top-k and top-n, probability mass for top-p and typical-p. Each level's histogram is the
//     sum of the blocks' histograms (integer atomics); from the second level on, the elements of
//     the chosen bucket are also gathered into a list, and when there are at most 256 of them every
//     block finishes the search from the list (rank by (key, id)), so most searches take 2-3
//     barriers. Ties at the threshold are cut in id order (the CPU sorts ties by id). A mask step
//     drops the rest (-inf) and leaves per-block sums for the log-sum-exp, the entropy and the
//     draw; the draw finds the first id whose cumulative probability, in id order, passes
//     u = uniform_from(seed, draw), as the CPU does: the block holding it scans its part.
//     Alternatives (top-n) are a count select, the survivors gathered into a list that the last
//     block of the row ranks.
// Weights are fixed-point integers: w(x) = round(expf(x - M) * 2^40) (M is the processed row's
// max, so w <= 2^40 and a row's total < 2^58), every histogram, scan and sum of weight is exact and
// order-free: identical inputs give identical outputs on every rank, with no float atomics. Float
// sums (log-sum-exp, entropy) are fixed-order reductions in double. A selection that keeps the
// smallest top set of mass >= p keeps the smallest prefix with integer weight >= ceil(p * total).
// The CPU computes each p in double; here exp is fp32 (~1e-7 relative), so a token can differ from
// the CPU's only where u (or top_p, typical_p) falls within ~1e-6 of a cumulative-mass boundary.
#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstring>

#include "kernels/cuda/ops.h"
#include "kernels/sample_checks.h"

namespace quilt::cuda {
namespace {

namespace cg = cooperative_groups;
using u64 = unsigned long long;

constexpr int kChunk = 2048;         // columns per stats block
constexpr int kStatThreads = 256;    // threads per stats block
constexpr int kThreads = 512;        // threads per select block
constexpr int kBlocksPerSm = 2;      // select blocks resident on one SM (launch bounds, shared memory)
constexpr int kMinSpan = 2048;       // columns per select block, at least
constexpr int kBuckets = 2048;       // radix buckets of the widest level (11 bits)
constexpr int kList = 256;           // a bucket's elements finished from a list, at most
constexpr int kMaxTopN = 1024;       // alternatives per row
constexpr int kSub = 2048;           // columns between folds of the 32-bit shared histograms
constexpr float kUnit = 0x1p40f;     // fixed-point unit of weight
constexpr unsigned kSmemOptInBit = 1u << 30;  // Context::smem_opt_in bit (attention uses 0..25)

// A batch row as the kernels read it (filled on the host, uploaded with the batch).
struct DevRow {
  uint64_t seed, draw;
  int32_t row, sel;  // logits row; select-kernel row, also the work row (-1: none)
  int32_t top_k, top_n, alt;  // top_n clipped to V; alt: first alternative slot of the result
  int32_t pen_begin, pen_count;
  int32_t sampling;
  float temperature, top_p, typical_p, rep, freq, pres;
};

struct Part {  // one chunk of one slot (stats kernel)
  float m;      // max of the processed chunk
  int32_t arg;  // first column holding it
  double s;     // sum of exp(x - m)
  double q;     // sum of exp(x - m) (x - m)
};

struct Summary {  // a slot's processed row
  float M;        // max
  int32_t arg;    // first column holding it
  double lse;     // log-sum-exp
  double H;       // entropy of softmax (sampling rows with typical-p only)
};

struct Entry {  // an element gathered for a list
  uint32_t key;
  int32_t id;
  u64 w;
};
struct TopEntry {  // a top-n survivor
  uint32_t key;
  int32_t id;
  float x;
};
// One radix level's histogram (summed over the row's blocks) and the elements of the chosen
// bucket of the previous level.
struct HistBuf {
  u64 w[kBuckets];
  u64 list_n;  // elements gathered (more than kList: the list overflowed, only kList kept)
  u64 pad;
  Entry list[kList];
};
// A select row's state between its blocks. Three histogram buffers rotate: the one a level uses
// was zeroed during the previous level (after every block had read its previous contents), so no
// extra barrier zeroes them; the stats kernel zeroes hist[0] and top_n.
struct RowState {
  HistBuf hist[3];
  u64 top_n, pad;
  TopEntry top[kMaxTopN];
};
struct MaskPart {  // one select block's kept elements
  double s, q;     // sum of exp(x - M), of exp(x - M) (x - M)
  u64 w;           // sum of weights
  int32_t last;    // last kept id (-1: none)
  int32_t pad;
};

// Order-preserving key of a float (larger float, larger key); -0 and +0 share one key.
__device__ __forceinline__ uint32_t fkey(float x) {
  const uint32_t b = __float_as_uint(__fadd_rn(x, 0.0f));
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Typical-p order: smaller |-lp - H| first, lp = x - lse. The key reverses the bits of the
// non-negative float; masked columns get 0, the last key.
__device__ __forceinline__ uint32_t tkey(float x, double lse, double H) {
  if (x == -INFINITY) return 0u;
  const double lp = static_cast<double>(x) - lse;
  return ~__float_as_uint(static_cast<float>(fabs(-lp - H)));
}

// The fixed-point weight of a column: round(exp(x - M) 2^40); 0 for masked columns.
__device__ __forceinline__ u64 weight_of_e(float e) { return __float2ull_rn(e * kUnit); }
__device__ __forceinline__ u64 weight_of(float x, float M) {
  return x == -INFINITY ? 0ull : weight_of_e(expf(x - M));
}

// The smallest integer weight >= p * total (at least 1; total when p rounds above it).
__device__ __forceinline__ u64 frac_need(float p, u64 total) {
  const u64 need = static_cast<u64>(ceil(static_cast<double>(p) * static_cast<double>(total)));
  return need < 1 ? 1 : need > total ? total : need;
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
struct SumD { __device__ double operator()(double a, double b) const { return a + b; } };
struct SumU { __device__ u64 operator()(u64 a, u64 b) const { return a + b; } };

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

// ---- kernel 1: stats ---------------------------------------------------------------------------

// dst[0, len) = src[0, len) as fp32, 16-byte loads where src allows.
template <typename T>
__device__ void load_span(const T* __restrict__ src, float* dst, int len) {
  constexpr int kV = kVec<T>;
  const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(src) & 15u) / sizeof(T));
  const int head = min(len, mis ? kV - mis : 0);
  for (int i = threadIdx.x; i < head; i += blockDim.x) dst[i] = to_f(src[i]);
  const int nvec = (len - head) / kV;
  for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
    float f[kV];
    load_vec(src + head + j * kV, f);
#pragma unroll
    for (int k = 0; k < kV; ++k) dst[head + j * kV + k] = f[k];
  }
  for (int i = head + nvec * kV + threadIdx.x; i < len; i += blockDim.x) dst[i] = to_f(src[i]);
}

// Folds (pm, pa, ps, pq) into (m, a, s, q), all relative to their own max.
__device__ __forceinline__ void fold_part(float& m, int& a, double& s, double& q, float pm, int pa, double ps,
                                          double pq) {
  if (pm == -INFINITY) return;
  if (m == -INFINITY) {
    m = pm, a = pa, s = ps, q = pq;
  } else if (pm > m) {
    const double d = static_cast<double>(m) - static_cast<double>(pm), f = exp(d);
    q = f * (q + s * d) + pq;
    s = s * f + ps;
    m = pm, a = pa;
  } else {
    const double d = static_cast<double>(pm) - static_cast<double>(m), f = exp(d);
    q += f * (pq + ps * d);
    s += f * ps;
    if (pm == m && pa < a) a = pa;
  }
}

template <typename T>
__global__ void __launch_bounds__(kStatThreads)
sample_stats_kernel(const T* __restrict__ logits,        // [P, M, Vr]
                    int64_t M, int64_t Vr, int V,
                    const DevRow* __restrict__ rows,     // [R]
                    int R,
                    const LogprobTarget* __restrict__ targets,  // [slots - R]
                    const SamplePenalty* __restrict__ pen,
                    float* __restrict__ work,            // [select rows, Vp]
                    int64_t Vp,
                    Part* __restrict__ parts,            // [slots, C]
                    int C,
                    Summary* __restrict__ summ,          // [slots]
                    int* __restrict__ counters,          // [slots], zero; left zero
                    RowState* __restrict__ states,       // [select rows]
                    uint32_t* __restrict__ res,          // [2 R + 2 A + targets]
                    int A) {
  __shared__ __align__(16) float xs[kChunk];
  __shared__ float red_f[32];
  __shared__ int red_i[32];
  __shared__ double red_d[32];
  __shared__ int is_last;
  const int slot = blockIdx.x, chunk = blockIdx.y, tid = threadIdx.x;
  const bool is_row = slot < R;
  const DevRow* rw = is_row ? rows + slot : nullptr;
  const int64_t r = is_row ? rw->row : targets[slot - R].row;
  const int v0 = chunk * kChunk, n = min(kChunk, V - v0);
  // The chunk may span shards: one contiguous span per shard.
  for (int64_t p = v0 / Vr; p * Vr < v0 + n; ++p) {
    const int64_t a = max(static_cast<int64_t>(v0), p * Vr), e = min(static_cast<int64_t>(v0 + n), (p + 1) * Vr);
    load_span(logits + (p * M + r) * Vr + (a - p * Vr), xs + (a - v0), static_cast<int>(e - a));
  }
  __syncthreads();
  bool want_q = false;
  if (is_row) {
    const bool do_rep = rw->rep != 1.0f, do_fp = rw->freq != 0.0f || rw->pres != 0.0f;
    if (do_rep || do_fp) {
      // Ids are distinct within a row, so each column has at most one writer.
      for (int e = tid; e < rw->pen_count; e += blockDim.x) {
        const SamplePenalty q = pen[rw->pen_begin + e];
        if (q.id < v0 || q.id >= v0 + n) continue;
        float s = xs[q.id - v0];
        // Explicit roundings: no FMA contraction, as the CPU computes it.
        if (do_rep && q.seen > 0) s = s > 0 ? __fdiv_rn(s, rw->rep) : __fmul_rn(s, rw->rep);
        if (do_fp && q.generated > 0)
          s = __fsub_rn(s, __fadd_rn(__fmul_rn(rw->freq, static_cast<float>(q.generated)), rw->pres));
        xs[q.id - v0] = s;
      }
      __syncthreads();
    }
    if (rw->sampling && rw->temperature != 1.0f) {
      for (int i = tid; i < n; i += blockDim.x) xs[i] = __fdiv_rn(xs[i], rw->temperature);
      __syncthreads();
    }
    want_q = rw->sampling && rw->typical_p < 1.0f;
    if (rw->sel >= 0) {
      float* w = work + static_cast<int64_t>(rw->sel) * Vp + v0;  // 16-byte aligned: Vp, v0 multiples of 4
      const int nv = n / 4;
      for (int j = tid; j < nv; j += blockDim.x)
        reinterpret_cast<float4*>(w)[j] = reinterpret_cast<const float4*>(xs)[j];
      for (int i = nv * 4 + tid; i < n; i += blockDim.x) w[i] = xs[i];
      // Zero the select kernel's first histogram buffer and top-n count, shared out over the chunks.
      RowState& st = states[rw->sel];
      for (int i = chunk * blockDim.x + tid; i < kBuckets + 2; i += C * blockDim.x) {
        if (i < kBuckets) st.hist[0].w[i] = 0;
        else if (i == kBuckets) st.hist[0].list_n = 0;
        else st.top_n = 0;
      }
    }
  }
  float m = -INFINITY;
  int a = INT_MAX;
  for (int i = tid; i < n; i += blockDim.x)
    if (xs[i] > m) m = xs[i], a = i;
  const float bm = block_reduce(m, MaxF{}, red_f);
  const int ba = block_reduce(m == bm ? a : INT_MAX, MinI{}, red_i);
  double s = 0, q = 0;
  if (bm != -INFINITY)
    for (int i = tid; i < n; i += blockDim.x) {
      const float d = xs[i] - bm, e = expf(d);
      s += static_cast<double>(e);
      if (want_q && e > 0.0f) q += static_cast<double>(e) * static_cast<double>(d);
    }
  const double bs = block_reduce(s, SumD{}, red_d);
  const double bq = want_q ? block_reduce(q, SumD{}, red_d) : 0.0;
  if (tid == 0) parts[static_cast<int64_t>(slot) * C + chunk] = Part{bm, bm == -INFINITY ? INT_MAX : v0 + ba, bs, bq};

  // The last chunk of the slot to finish folds the slot's parts.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    is_last = atomicAdd(&counters[slot], 1) == C - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  m = -INFINITY, a = INT_MAX, s = 0, q = 0;
  for (int c = tid; c < C; c += blockDim.x) {  // ascending chunks: ties keep the earlier column
    const Part* p = parts + static_cast<int64_t>(slot) * C + c;
    fold_part(m, a, s, q, __ldcg(&p->m), __ldcg(&p->arg), __ldcg(&p->s), __ldcg(&p->q));
  }
  const float M1 = block_reduce(m, MaxF{}, red_f);
  const int arg = block_reduce(m == M1 && m != -INFINITY ? a : INT_MAX, MinI{}, red_i);
  const double d = m == -INFINITY ? 0.0 : static_cast<double>(m) - static_cast<double>(M1);
  const double f = m == -INFINITY ? 0.0 : exp(d);
  const double S = block_reduce(s * f, SumD{}, red_d);
  const double Q = block_reduce(f * (q + s * d), SumD{}, red_d);
  if (tid == 0) {
    const double lse = static_cast<double>(M1) + log(S);
    summ[slot] = Summary{M1, arg, lse, log(S) - Q / S};
    int32_t* res_id = reinterpret_cast<int32_t*>(res);
    float* res_lp = reinterpret_cast<float*>(res + R);
    float* tgt_lp = reinterpret_cast<float*>(res + 2 * R + 2 * A);
    if (!is_row) {  // a prompt-logprob target: log_softmax of the raw row
      const LogprobTarget t = targets[slot - R];
      const int64_t p = t.id / Vr, j = t.id - p * Vr;
      const float x = to_f(logits[(p * M + t.row) * Vr + j]);
      tgt_lp[slot - R] = static_cast<float>(static_cast<double>(x) - lse);
    } else if (!rw->sampling) {
      res_id[slot] = arg;
      res_lp[slot] = static_cast<float>(static_cast<double>(M1) - lse);
    }
    counters[slot] = 0;  // ready for the next launch (stream order)
  }
}

// ---- kernel 2: select --------------------------------------------------------------------------

struct Smem {
  u64 hist[kBuckets];  // the radix histogram (two 32-bit halves); also the list being resolved, the top-n entries
  Entry list[kList];   // this block's elements for the list
  u64 red_u[32];
  double red_d[32];
  double red_d2[32];
  u64 red_u2[32];
  int red_i[32];
  int cnt, flag, sel;
  u64 base, sel_above, sel_w;
};

// One select block: its part [v0, v0 + n) of the row, the first nc columns in shared memory.
struct Blk {
  int g, G;
  int v0, n, nc;
  float* sx;  // shared [nc]
  float* gx;  // the work row from v0 (columns nc.. are read and written there)
  RowState* st;
  MaskPart* parts;  // [G]
  u64* ties;        // [G]
  int* ctr;         // the row's barrier count (zero at launch; left zero)
  int nb;           // barriers passed
  int hu;           // histogram buffers used
};

__device__ __forceinline__ float& at(const Blk& b, int i) { return i < b.nc ? b.sx[i] : b.gx[i]; }

// f(i, x&) over the block's columns; each thread visits its columns in ascending order.
template <typename F>
__device__ __forceinline__ void each(const Blk& b, F&& f) {
  for (int i = threadIdx.x; i < b.nc; i += kThreads) f(i, b.sx[i]);
  for (int i = b.nc + threadIdx.x; i < b.n; i += kThreads) f(i, b.gx[i]);
}

// The G blocks of a row wait for each other; their global writes before it are visible after it.
__device__ void row_barrier(Blk& b) {
  __syncthreads();
  if (b.G > 1 && threadIdx.x == 0) {
    const int target = (b.nb + 1) * b.G;
    __threadfence();
    atomicAdd(b.ctr, 1);
    while (*reinterpret_cast<volatile int*>(b.ctr) < target) {
    }
    __threadfence();
  }
  ++b.nb;
  __syncthreads();
}

// Every block of the row calls it once, last: true in the last block to arrive (which sees the
// others' writes and resets the count for the next launch).
__device__ bool row_exit(Blk& b, Smem& sm) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int last = 1;
    if (b.G > 1) {
      __threadfence();
      last = atomicAdd(b.ctr, 1) == (b.nb + 1) * b.G - 1;
      if (last) {
        atomicExch(b.ctr, 0);
        __threadfence();
      }
    }
    sm.flag = last;
  }
  __syncthreads();
  return sm.flag != 0;
}

// Zeroes a histogram buffer (its buckets and list count), shared out over the row's blocks.
__device__ void zero_buf(const Blk& b, HistBuf& h) {
  for (int i = b.g * kThreads + threadIdx.x; i <= kBuckets; i += b.G * kThreads) {
    if (i < kBuckets) h.w[i] = 0;
    else h.list_n = 0;
  }
}

// Buckets [0, nb) with weights get(j), scanned from the largest bucket down after `above`: the
// bucket where the cumulative weight first reaches need = need_of(total of the buckets). Returns
// false when none does; bucket, above (now including the larger buckets) and its weight otherwise.
template <typename Get, typename NeedOf>
__device__ bool scan_select(int nb, Get get, NeedOf need_of, Smem& sm, int& bucket, u64& above, u64& bw,
                            u64& need) {
  const int items = nb / kThreads;  // 4 or 2
  u64 h[4], local = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    h[j] = j < items ? get(nb - 1 - (static_cast<int>(threadIdx.x) * items + j)) : 0ull;
    local += h[j];
  }
  if (threadIdx.x == 0) sm.sel = -1;
  u64 total;
  const u64 incl = block_scan(local, sm.red_u, total);  // its barriers publish sm.sel
  need = need_of(total);
  u64 run = above + incl - local;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j < items && run < need && need <= run + h[j]) {
      sm.sel = nb - 1 - (static_cast<int>(threadIdx.x) * items + j);
      sm.sel_above = run;
      sm.sel_w = h[j];
    }
    run += h[j];
  }
  __syncthreads();
  bucket = sm.sel;
  if (bucket >= 0) above = sm.sel_above, bw = sm.sel_w;
  __syncthreads();  // everyone has read sel_* before the next scan rewrites them
  return bucket >= 0;
}

// The first column v of the block, in id order, where base + the weights of its columns <= v
// reaches need; INT_MAX when none does. Coalesced: the range narrows to the one of 16 warp ranges
// holding the crossing until at most kThreads columns are left, one per thread for a block scan.
template <typename W>
__device__ int block_crossing(const Blk& b, Smem& sm, u64 base, u64 need, W wf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kThreads / 32;
  int lo = 0, hi = b.n;
  while (hi - lo > kThreads) {
    const int per = (hi - lo + warps - 1) / warps;
    const int wlo = min(hi, lo + warp * per), whi = min(hi, wlo + per);
    u64 s = 0;
    for (int i = wlo + lane; i < whi; i += 32) s += wf(at(b, i));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __syncthreads();  // red_u may still be read
    if (lane == 0) sm.red_u[warp] = s;
    __syncthreads();
    int sel = -1;
    u64 run = base;
    for (int w = 0; w < warps && sel < 0; ++w) {  // the same in every thread
      const u64 v = sm.red_u[w];
      if (run < need && need <= run + v) sel = w;
      else run += v;
    }
    if (sel < 0) return INT_MAX;  // (uniform: every thread read the same sums)
    base = run;
    const int nlo = min(hi, lo + sel * per);
    hi = min(hi, nlo + per);
    lo = nlo;
  }
  const int i = lo + static_cast<int>(threadIdx.x);
  const u64 w = i < hi ? wf(at(b, i)) : 0ull;
  u64 total;
  const u64 incl = block_scan(w, sm.red_u, total);
  const int found = w > 0 && base + incl - w < need && need <= base + incl ? b.v0 + i : INT_MAX;
  return block_reduce(found, MinI{}, sm.red_i);
}

// A threshold: kept are the columns with key > t, and those with key == t and id <= cut.
struct Sel {
  uint32_t t;
  int cut;
};

// Finishes a search from the list of the chosen bucket's elements (n <= kList, any order): the
// element, in (key descending, id ascending) order, where above + the cumulative weight reaches need.
__device__ Sel resolve(const HistBuf& H, int n, u64 above, u64 need, bool keep_ties, Smem& sm) {
  const int tid = threadIdx.x;
  u64* ck = sm.hist;               // [kList] (key, ~id): descending = the CPU's order
  u64* w = sm.hist + kList;        // [kList]
  u64* sw = sm.hist + 2 * kList;   // [kList] weights in that order
  u64* si = sm.hist + 3 * kList;   // [kList] list index in that order
  __syncthreads();
  if (tid < n) {
    const Entry* e = H.list + tid;
    ck[tid] = (static_cast<u64>(__ldcg(&e->key)) << 32) | (0xffffffffu - static_cast<uint32_t>(__ldcg(&e->id)));
    w[tid] = __ldcg(&e->w);
  }
  if (tid == 0) sm.sel = n - 1;  // (need is always reached: the bucket's weight covers it)
  __syncthreads();
  if (tid < n) {
    const u64 c = ck[tid];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += ck[j] > c;
    sw[rank] = w[tid];
    si[rank] = static_cast<u64>(tid);
  }
  __syncthreads();
  const u64 v = tid < n ? sw[tid] : 0ull;
  u64 total;
  const u64 incl = block_scan(v, sm.red_u, total);
  if (tid < n && above + incl - v < need && need <= above + incl) sm.sel = tid;
  __syncthreads();
  const u64 c = ck[si[max(sm.sel, 0)]];
  __syncthreads();
  const uint32_t t = static_cast<uint32_t>(c >> 32);
  const int id = static_cast<int>(0xffffffffu - static_cast<uint32_t>(c));
  return Sel{t, keep_ties ? INT_MAX : id};
}

// Adds weight(x) of the block's columns whose key has (key & pmask) == prefix to the row's histogram
// dst at bucket (key >> sh) & (nbk - 1), and calls visit(i, key, weight) for each. The shared
// histogram is two 32-bit halves (native shared atomics: 64-bit ones are CAS loops) of a weight's
// low 20 and high 21 bits, folded into u64 registers every kSub columns, before either can overflow.
template <typename Key, typename Weight, typename Visit>
__device__ void hist_pass(const Blk& b, Smem& sm, int nbk, int sh, uint32_t pmask, uint32_t prefix, Key key,
                          Weight weight, Visit visit, u64* dst) {
  unsigned* lo = reinterpret_cast<unsigned*>(sm.hist);
  unsigned* hi = lo + kBuckets;
  const int tid = threadIdx.x, items = nbk / kThreads;  // thread t folds buckets [t * items, + items)
  u64 acc[4] = {0, 0, 0, 0};
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < items) lo[tid * items + j] = hi[tid * items + j] = 0;
  __syncthreads();
  for (int c0 = 0; c0 < b.n; c0 += kSub) {
    const int c1 = min(b.n, c0 + kSub);
    for (int i = c0 + tid; i < c1; i += kThreads) {
      const float x = i < b.nc ? b.sx[i] : b.gx[i];
      const uint32_t k = key(x);
      if ((k & pmask) != prefix) continue;
      const u64 w = weight(x);
      if (!w) continue;
      const int bk = static_cast<int>((k >> sh) & static_cast<uint32_t>(nbk - 1));
      const unsigned wl = static_cast<unsigned>(w & 0xFFFFFull), wh = static_cast<unsigned>(w >> 20);
      if (wl) atomicAdd(lo + bk, wl);  // < kSub * 2^20 = 2^31 per fold
      if (wh) atomicAdd(hi + bk, wh);  // <= kSub * 2^20 (w <= 2^40)
      visit(i, k, w);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < items) {
        const int bk = tid * items + j;
        acc[j] += (static_cast<u64>(hi[bk]) << 20) + lo[bk];
        lo[bk] = hi[bk] = 0;
      }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < items && acc[j]) atomicAdd(dst + tid * items + j, acc[j]);
}

// Radix select over the row: the threshold where the cumulative weight (need_of(total weight)),
// from the largest key down, is first reached; ties at the threshold all kept (keep_ties) or cut
// in id order. Weight 0 columns take no part.
template <typename Key, typename Weight, typename NeedOf>
__device__ Sel select(Blk& b, Smem& sm, Key key, Weight weight, NeedOf need_of, bool keep_ties) {
  const int tid = threadIdx.x;
  // Level 0: the top 11 bits of every column's key.
  HistBuf* H = &b.st->hist[b.hu % 3];
  zero_buf(b, b.st->hist[(b.hu + 1) % 3]);
  ++b.hu;
  hist_pass(b, sm, kBuckets, 21, 0u, 0u, key, weight, [](int, uint32_t, u64) {}, H->w);
  row_barrier(b);
  int bk;
  u64 above = 0, bw = 0, need = 0;
  if (!scan_select(kBuckets, [&](int j) { return __ldcg(&H->w[j]); }, need_of, sm, bk, above, bw, need))
    return Sel{0u, INT_MAX};  // need above the total: keep everything
  uint32_t prefix = static_cast<uint32_t>(bk) << 21, pmask = 0xFFE00000u;
  // Levels 1 and 2: the next 11 and the last 10 bits of the columns in the chosen bucket, which
  // also go to the list.
  for (int lv = 1; lv <= 2; ++lv) {
    const int sh = lv == 1 ? 10 : 0, nbk = lv == 1 ? 2048 : 1024;
    H = &b.st->hist[b.hu % 3];
    zero_buf(b, b.st->hist[(b.hu + 1) % 3]);
    ++b.hu;
    if (tid == 0) sm.cnt = 0;  // (hist_pass syncs before it counts)
    hist_pass(b, sm, nbk, sh, pmask, prefix, key, weight, [&](int i, uint32_t k, u64 w) {
      const cg::coalesced_group grp = cg::coalesced_threads();
      int base = 0;
      if (grp.thread_rank() == 0) base = atomicAdd(&sm.cnt, static_cast<int>(grp.size()));
      const int slot = grp.shfl(base, 0) + static_cast<int>(grp.thread_rank());
      if (slot < kList) sm.list[slot] = Entry{k, b.v0 + i, w};
    }, H->w);
    if (tid == 0) sm.base = sm.cnt ? atomicAdd(&H->list_n, static_cast<u64>(sm.cnt)) : 0ull;
    __syncthreads();
    const int mine = min(sm.cnt, kList);
    for (int j = tid; j < mine; j += kThreads)
      if (sm.base + j < static_cast<u64>(kList)) H->list[sm.base + j] = sm.list[j];
    row_barrier(b);
    const u64 ln = __ldcg(&H->list_n);
    if (ln > 0 && ln <= static_cast<u64>(kList)) return resolve(*H, static_cast<int>(ln), above, need, keep_ties, sm);
    const u64 fixed = need;
    if (!scan_select(nbk, [&](int j) { return __ldcg(&H->w[j]); }, [fixed](u64) { return fixed; }, sm, bk, above,
                     bw, need))
      return Sel{prefix, INT_MAX};  // unreachable: the bucket's weight reaches need
    prefix |= static_cast<uint32_t>(bk) << sh;
    pmask |= static_cast<uint32_t>(nbk - 1) << sh;
  }
  // The threshold is the key `prefix`, bw the weight of its ties.
  const uint32_t t = prefix;
  if (keep_ties || need >= above + bw) return Sel{t, INT_MAX};
  // More than kList ties: each block's tie weight, then the block holding the cut finds it.
  u64 tw = 0;
  each(b, [&](int, float& x) {
    if (key(x) == t) tw += weight(x);
  });
  tw = block_reduce(tw, SumU{}, sm.red_u);
  if (tid == 0) b.ties[b.g] = tw;
  row_barrier(b);
  const u64 pre = block_reduce(tid < b.g ? __ldcg(&b.ties[tid]) : 0ull, SumU{}, sm.red_u);
  int cut;
  if (above + pre + tw < need) cut = INT_MAX;
  else if (above + pre >= need) cut = -1;
  else cut = block_crossing(b, sm, above + pre, need, [&](float x) { return key(x) == t ? weight(x) : 0ull; });
  return Sel{t, cut};
}

// The row after a mask: its log-sum-exp and entropy, the total weight, this block's weight and
// that of the blocks before it (the draw's prefix), the last kept id.
struct Kept {
  double lse, H;
  u64 W, pre, mine;
  int last;
};

// Sums over the block: two doubles, two integers and a max.
__device__ void block_sums(double& a, double& b2, u64& c, u64& d, int& e, Smem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b2 += __shfl_xor_sync(0xffffffffu, b2, o);
    c += __shfl_xor_sync(0xffffffffu, c, o);
    d += __shfl_xor_sync(0xffffffffu, d, o);
    e = max(e, __shfl_xor_sync(0xffffffffu, e, o));
  }
  __syncthreads();
  if (lane == 0) sm.red_d[warp] = a, sm.red_d2[warp] = b2, sm.red_u[warp] = c, sm.red_u2[warp] = d, sm.red_i[warp] = e;
  __syncthreads();
  a = sm.red_d[0], b2 = sm.red_d2[0], c = sm.red_u[0], d = sm.red_u2[0], e = sm.red_i[0];
  for (int w = 1; w < warps; ++w) {  // the same order in every thread
    a += sm.red_d[w], b2 += sm.red_d2[w], c += sm.red_u[w], d += sm.red_u2[w];
    e = max(e, sm.red_i[w]);
  }
  __syncthreads();
}

// Masks (to -inf) the columns that `s` rejects and sums the rest over the row.
template <typename Key>
__device__ Kept mask(Blk& b, Smem& sm, Sel s, Key key, float M) {
  double sd = 0, qd = 0;
  u64 w = 0, unused = 0;
  int last = -1;
  each(b, [&](int i, float& x) {
    if (x == -INFINITY) return;
    const uint32_t k = key(x);
    if (k < s.t || (k == s.t && b.v0 + i > s.cut)) {
      x = -INFINITY;
      return;
    }
    const float d = x - M, e = expf(d);
    sd += static_cast<double>(e);
    qd += static_cast<double>(e) * static_cast<double>(d);
    w += weight_of_e(e);
    last = b.v0 + i;
  });
  block_sums(sd, qd, w, unused, last, sm);
  if (threadIdx.x == 0) b.parts[b.g] = MaskPart{sd, qd, w, last, 0};
  row_barrier(b);
  const int tid = threadIdx.x;
  double S = 0, Q = 0;
  u64 W = 0, pre = 0;
  int lst = -1;
  if (tid < b.G) {
    const MaskPart* p = b.parts + tid;
    S = __ldcg(&p->s), Q = __ldcg(&p->q), W = __ldcg(&p->w), lst = __ldcg(&p->last);
    if (tid < b.g) pre = W;
  }
  block_sums(S, Q, W, pre, lst, sm);
  return Kept{static_cast<double>(M) + log(S), log(S) - Q / S, W, pre, w, lst};
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
sample_select_kernel(const DevRow* __restrict__ rows,       // [R]
                     const int32_t* __restrict__ sel_rows,  // [select rows]: batch row
                     int G, int span, int ncache, int V, int64_t Vp,
                     float* work,                           // [select rows, Vp]: read and masked here
                     const Summary* __restrict__ summ,      // [slots]
                     RowState* __restrict__ states,         // [select rows]
                     MaskPart* __restrict__ mparts,         // [select rows, G]
                     u64* __restrict__ ties,                // [select rows, G]
                     int* __restrict__ counters,            // [select rows], zero; left zero
                     uint32_t* __restrict__ res,            // [2 R + 2 A + targets]
                     int R, int A) {
  extern __shared__ float4 dyn[];
  __shared__ Smem sm;
  const int q = blockIdx.x / G, tid = threadIdx.x;
  Blk b;
  b.g = blockIdx.x % G;
  b.G = G;
  b.v0 = b.g * span;
  b.n = max(0, min(span, V - b.v0));
  b.nc = min(b.n, ncache);
  b.sx = reinterpret_cast<float*>(dyn);
  b.gx = work + static_cast<int64_t>(q) * Vp + b.v0;  // 16-byte aligned: Vp and span are multiples of 4
  b.st = states + q;
  b.parts = mparts + static_cast<int64_t>(q) * G;
  b.ties = ties + static_cast<int64_t>(q) * G;
  b.ctr = counters + q;
  b.nb = 0;
  b.hu = 0;
  for (int j = tid; j < b.nc / 4; j += kThreads) dyn[j] = reinterpret_cast<const float4*>(b.gx)[j];
  for (int i = b.nc / 4 * 4 + tid; i < b.nc; i += kThreads) b.sx[i] = b.gx[i];
  const int ri = sel_rows[q];
  const DevRow rw = rows[ri];
  const Summary S = summ[ri];
  int32_t* res_id = reinterpret_cast<int32_t*>(res);
  float* res_lp = reinterpret_cast<float*>(res + R);
  int32_t* alt_id = reinterpret_cast<int32_t*>(res + 2 * R);
  float* alt_lp = reinterpret_cast<float*>(res + 2 * R + A);
  __syncthreads();

  const float M = S.M;
  double lse = S.lse;
  auto fk = [](float x) { return fkey(x); };
  auto one = [](float) { return 1ull; };
  auto mass = [M](float x) { return weight_of(x, M); };
  if (rw.sampling) {
    Kept kp{};
    bool masked = false;
    if (rw.top_k > 0 && rw.top_k < V) {
      const u64 k = static_cast<u64>(rw.top_k);
      const Sel s = select(b, sm, fk, one, [k](u64) { return k; }, true);  // HF keeps ties with the k-th
      kp = mask(b, sm, s, fk, M);
      masked = true;
    }
    if (rw.top_p < 1.0f) {
      const float p = rw.top_p;
      const Sel s = select(b, sm, fk, mass, [p](u64 total) { return frac_need(p, total); }, false);
      kp = mask(b, sm, s, fk, M);
      masked = true;
    }
    if (rw.typical_p < 1.0f) {
      const double l0 = masked ? kp.lse : S.lse, h0 = masked ? kp.H : S.H;
      auto tk = [l0, h0](float x) { return tkey(x, l0, h0); };
      const float p = rw.typical_p;
      const Sel s = select(b, sm, tk, mass, [p](u64 total) { return frac_need(p, total); }, false);
      kp = mask(b, sm, s, tk, M);
      masked = true;
    }
    if (!masked) kp = mask(b, sm, Sel{0u, INT_MAX}, fk, M);  // keeps every column: the draw's sums
    lse = kp.lse;
    // The draw: the first id whose cumulative weight (in id order) exceeds u * total.
    const double u = uniform_from(rw.seed, rw.draw);
    const u64 need = __double2ull_rd(u * static_cast<double>(kp.W)) + 1;
    if (need <= kp.W) {
      if (kp.pre < need && need <= kp.pre + kp.mine) {
        const int id = block_crossing(b, sm, kp.pre, need, mass);
        if (tid == 0 && id != INT_MAX) {
          res_id[ri] = id;
          res_lp[ri] = static_cast<float>(static_cast<double>(at(b, id - b.v0)) - lse);
        }
      }
    } else if (tid == 0 && kp.last >= b.v0 && kp.last < b.v0 + b.n) {  // u past the rounded total: the last kept id
      res_id[ri] = kp.last;
      res_lp[ri] = static_cast<float>(static_cast<double>(at(b, kp.last - b.v0)) - lse);
    }
  }
  if (rw.top_n <= 0) {
    row_exit(b, sm);
    return;
  }
  // Alternatives: the top_n columns (value descending, ties by id), gathered, then ranked by the
  // last block of the row.
  const int n = rw.top_n;
  const Sel s = select(b, sm, fk, one, [n](u64) { return static_cast<u64>(n); }, false);
  TopEntry* stage = reinterpret_cast<TopEntry*>(sm.hist);  // [kMaxTopN]
  __syncthreads();
  if (tid == 0) sm.cnt = 0;
  __syncthreads();
  each(b, [&](int i, float& x) {
    const uint32_t k = fkey(x);
    if (k < s.t || (k == s.t && b.v0 + i > s.cut)) return;
    const cg::coalesced_group grp = cg::coalesced_threads();
    int base = 0;
    if (grp.thread_rank() == 0) base = atomicAdd(&sm.cnt, static_cast<int>(grp.size()));
    const int slot = grp.shfl(base, 0) + static_cast<int>(grp.thread_rank());
    if (slot < kMaxTopN) stage[slot] = TopEntry{k, b.v0 + i, x};
  });
  __syncthreads();
  if (tid == 0) sm.base = sm.cnt ? atomicAdd(&b.st->top_n, static_cast<u64>(sm.cnt)) : 0ull;
  __syncthreads();
  for (int j = tid; j < min(sm.cnt, kMaxTopN); j += kThreads)
    if (sm.base + j < static_cast<u64>(kMaxTopN)) b.st->top[sm.base + j] = stage[j];
  if (!row_exit(b, sm)) return;
  const int cnt = static_cast<int>(min(__ldcg(&b.st->top_n), static_cast<u64>(kMaxTopN)));
  u64* ck = sm.hist;                                        // [kMaxTopN]
  float* xv = reinterpret_cast<float*>(sm.hist + kMaxTopN);  // [kMaxTopN]
  for (int i = tid; i < cnt; i += kThreads) {
    const TopEntry* e = b.st->top + i;
    ck[i] = (static_cast<u64>(__ldcg(&e->key)) << 32) | (0xffffffffu - static_cast<uint32_t>(__ldcg(&e->id)));
    xv[i] = __ldcg(&e->x);
  }
  __syncthreads();
  for (int i = tid; i < cnt; i += kThreads) {
    const u64 c = ck[i];
    int rank = 0;
    for (int j = 0; j < cnt; ++j) rank += ck[j] > c;
    if (rank < n) {
      alt_id[rw.alt + rank] = static_cast<int>(0xffffffffu - static_cast<uint32_t>(c));
      alt_lp[rw.alt + rank] = static_cast<float>(static_cast<double>(xv[i]) - lse);
    }
  }
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

void sample(Context& c, SampleResult& out, const Tensor& logits, const SampleBatch& batch) {
  QUILT_ASSERT(logits.device() == Device::cuda && logits.dtype() != DType::i32, "sample: logits ", logits.describe());
  const SampleLayout L = check_sample_batch(logits, batch);
  const int R = static_cast<int>(batch.rows.size()), NT = static_cast<int>(batch.targets.size());
  const int V = static_cast<int>(L.vocab), slots = R + NT;
  out.tokens.assign(R, SampledToken{});
  out.target_logprobs.assign(NT, 0.0f);
  if (slots == 0) return;
  const int C = (V + kChunk - 1) / kChunk;
  QUILT_REQUIRE(C <= 65535, "sample: vocab ", V, " too large for the cuda sampler");
  const int64_t Vp = (static_cast<int64_t>(V) + 3) / 4 * 4;  // work row stride: 16-byte rows

  // Rows as the kernels read them; rows that sample or report alternatives go to the select kernel.
  std::vector<DevRow> rows(R);
  std::vector<int32_t> sel_rows;
  int A = 0;
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
    d.sel = -1;
    if (d.sampling || d.top_n > 0) {
      d.sel = static_cast<int32_t>(sel_rows.size());
      sel_rows.push_back(i);
    }
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
  const int R2 = static_cast<int>(sel_rows.size());

  // The select grid: G blocks per row, as many as fill the GPU (each at least kMinSpan columns);
  // with G > 1 the launch is cooperative, so all R2 * G blocks must be resident at once.
  int G = 1, span = static_cast<int>(Vp), ncache = 0;
  if (R2 > 0) {
    int smem_sm = 0, reserved = 0, optin = 0, coop = 0;
    check(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, c.device), "sample: attribute");
    check(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, c.device), "sample: attribute");
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c.device), "sample: attribute");
    check(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, c.device), "sample: attribute");
    const int64_t fixed = static_cast<int64_t>(sizeof(Smem)) + 256;
    const int64_t budget = std::min<int64_t>(smem_sm / kBlocksPerSm - reserved - fixed, optin - fixed);
    const int cache_max = static_cast<int>(std::max<int64_t>(0, budget / 16 * 4));  // floats, a multiple of 4
    if (!(c.smem_opt_in & kSmemOptInBit)) {
      // Above 48 KB a kernel must opt in; once per device (the context is per device).
      check(cudaFuncSetAttribute(sample_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 cache_max * static_cast<int>(sizeof(float))),
            "sample: shared memory opt-in");
      int occ = 0;
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, sample_select_kernel, kThreads,
                                                          static_cast<size_t>(cache_max) * sizeof(float)),
            "sample: occupancy");
      QUILT_ASSERT(occ >= kBlocksPerSm, "sample: the select kernel fits ", occ, " blocks per SM, not ",
                   kBlocksPerSm);
      c.smem_opt_in |= kSmemOptInBit;
    }
    if (coop && R2 <= c.counter_count) {
      const int cap = kBlocksPerSm * c.num_sms;
      G = std::max(1, std::min({(V + kMinSpan - 1) / kMinSpan, cap / R2, kThreads}));  // folds read G parts
    }
    span = static_cast<int>((static_cast<int64_t>(V) + G - 1) / G + 3) / 4 * 4;
    G = (V + span - 1) / span;
    ncache = std::min(span, cache_max);
  }

  // One upload: [rows][select rows][targets][penalties]; scratch: that, then the chunk stats, the
  // summaries, the result, the select state, the work rows and (when the context's are too few)
  // the stats kernel's counters.
  const size_t rows_b = R * sizeof(DevRow), sel_off = align256(rows_b), sel_b = R2 * sizeof(int32_t);
  const size_t tgt_off = align256(sel_off + sel_b), tgt_b = NT * sizeof(LogprobTarget);
  const size_t pen_off = align256(tgt_off + tgt_b), pen_b = batch.penalties.size() * sizeof(SamplePenalty);
  const size_t params_b = pen_off + pen_b;
  const size_t parts_off = align256(params_b), parts_b = static_cast<size_t>(slots) * C * sizeof(Part);
  const size_t summ_off = align256(parts_off + parts_b), summ_b = static_cast<size_t>(slots) * sizeof(Summary);
  const size_t res_off = align256(summ_off + summ_b), res_b = static_cast<size_t>(2 * R + 2 * A + NT) * 4;
  const size_t st_off = align256(res_off + res_b), st_b = static_cast<size_t>(R2) * sizeof(RowState);
  const size_t mp_off = align256(st_off + st_b), mp_b = static_cast<size_t>(R2) * G * sizeof(MaskPart);
  const size_t ties_off = align256(mp_off + mp_b), ties_b = static_cast<size_t>(R2) * G * sizeof(u64);
  const size_t work_off = align256(ties_off + ties_b), work_b = static_cast<size_t>(R2) * Vp * sizeof(float);
  const bool own_counters = slots > c.counter_count;
  const size_t ctr_off = align256(work_off + work_b), ctr_b = own_counters ? slots * sizeof(int) : 0;
  char* dev = static_cast<char*>(c.scratch(ctr_off + ctr_b, "sample"));

  // Pinned staging, as the backend's uploads: wait only when the ring is full.
  char* staged = c.staging(params_b, "sample: upload");
  if (rows_b) std::memcpy(staged, rows.data(), rows_b);
  if (sel_b) std::memcpy(staged + sel_off, sel_rows.data(), sel_b);
  if (tgt_b) std::memcpy(staged + tgt_off, batch.targets.data(), tgt_b);
  if (pen_b) std::memcpy(staged + pen_off, batch.penalties.data(), pen_b);
  c.upload_staged(dev, staged, params_b, "sample: upload");

  const auto* d_rows = reinterpret_cast<const DevRow*>(dev);
  const auto* d_sel = reinterpret_cast<const int32_t*>(dev + sel_off);
  const auto* d_tgt = reinterpret_cast<const LogprobTarget*>(dev + tgt_off);
  const auto* d_pen = reinterpret_cast<const SamplePenalty*>(dev + pen_off);
  auto* d_parts = reinterpret_cast<Part*>(dev + parts_off);
  auto* d_summ = reinterpret_cast<Summary*>(dev + summ_off);
  auto* d_res = reinterpret_cast<uint32_t*>(dev + res_off);
  auto* d_st = reinterpret_cast<RowState*>(dev + st_off);
  auto* d_mp = reinterpret_cast<MaskPart*>(dev + mp_off);
  auto* d_ties = reinterpret_cast<u64*>(dev + ties_off);
  auto* d_work = reinterpret_cast<float*>(dev + work_off);
  int* d_ctr = c.counters;
  if (own_counters) {
    d_ctr = reinterpret_cast<int*>(dev + ctr_off);
    check(cudaMemsetAsync(d_ctr, 0, ctr_b, c.stream), "sample: counters");
  }
  dispatch(logits.dtype(), "sample", [&](auto tag) {
    using T = decltype(tag);
    sample_stats_kernel<T><<<dim3(slots, C), kStatThreads, 0, c.stream>>>(
        logits.as<T>(), L.rows, L.shard_vocab, V, d_rows, R, d_tgt, d_pen, d_work, Vp, d_parts, C, d_summ, d_ctr,
        d_st, d_res, A);
    check_launch("sample: stats");
  });
  if (R2 > 0) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(R2 * G));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(ncache) * sizeof(float);
    cfg.stream = c.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = G > 1 ? 1 : 0;  // the G blocks of a row wait for each other: all resident
    check(cudaLaunchKernelEx(&cfg, sample_select_kernel, d_rows, d_sel, G, span, ncache, V, Vp, d_work,
                             static_cast<const Summary*>(d_summ), d_st, d_mp, d_ties, c.counters, d_res, R, A),
          "sample: select");
  }

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
