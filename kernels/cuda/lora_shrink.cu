// Multi-LoRA shrink of a step (lora_plan.h): for every tile (up to 8 rows of one adapter slot)
// and module of the group (q/k/v, gate/up, o or down), v = x[rows] A^T in fp32, for lora_expand.
// Everything comes from the plan in device memory (the tile count too), so the launch depends on
// step.max_tiles alone and a graph replays it for any adapter mix.
//
// Work items are (tile, K split): the splits make tiles x splits about kLoraTargetItems (a decode
// batch with few adapters still spreads its A reads over the GPU), decided on the device from the
// tile count (lora_split). A fixed grid of small blocks (4 warps: they fit beside the base
// matmul's blocks) strides over the items. Each warp takes groups of 4 ranks of one module, its
// lanes striding the split's K range with 16-byte loads of x (8 rows, through L1: every warp of
// the block reads the same x) and of the 4 A rows; 8 rows x 4 ranks = 32 fp32 sums per lane,
// reduce-scattered over the warp (31 shuffles) to one per lane. When the tile has fewer rank
// groups than warps (rank 8 on one module: 2), the warps of a group split the K range further and
// meet in shared memory. The splits of a tile meet through the last one to finish, which sums them
// in split order. Every sum has a fixed order: bitwise reproducible, as graphs against eager steps
// need.
//
// With Context::lora_overlap the kernel runs on a second stream, forked here from the compute
// stream and joined by lora_expand: the base matmul enqueued in between (which writes y, never x)
// runs beside it, in a graph as two branches.
#include <algorithm>

#include "kernels/cuda/lora_common.cuh"
#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kThreads = 128;  // small blocks: they fit beside the base matmul's on an SM
constexpr int kWarps = kThreads / 32;
constexpr int kRanks = 4;  // ranks per warp pass: kLoraTileRows x kRanks = 32 sums
static_assert(kLoraTileRows * kRanks == 32, "one sum per lane after the reduce-scatter");
constexpr int64_t kStride = kLoraMaxGroup * kLoraMaxRank;  // partial floats per (split, tile, row)

struct GroupArgs {
  int count;
  int module[kLoraMaxGroup];
};

// acc[i * kRanks + q] += x[row i][k] * A[rank q][k] over this lane's 16-byte vectors at k in
// [k_begin, k_end) (step apart), all loads of a vector issued together. Rows past nrows and ranks
// past nrank load nothing. x's rows and a's rows must be 16-byte aligned (K % V == 0).
template <typename T>
__device__ __forceinline__ void dot_range_vec(float (&acc)[32], const T* x, const int (&rows)[kLoraTileRows],
                                              int nrows, const T* a, int64_t K, int nrank, int64_t k_begin,
                                              int64_t k_end, int64_t step) {
  constexpr int V = kVec<T>;
  for (int64_t k = k_begin; k < k_end; k += step) {
    uint4 xraw[kLoraTileRows], araw[kRanks];
#pragma unroll
    for (int i = 0; i < kLoraTileRows; ++i)
      xraw[i] = i < nrows ? *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(rows[i]) * K + k)
                          : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int q = 0; q < kRanks; ++q)
      araw[q] = q < nrank ? *reinterpret_cast<const uint4*>(a + q * K + k) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < kLoraTileRows; ++i) {
      float xv[V];
      lora::unpack<T>(xraw[i], xv);
#pragma unroll
      for (int q = 0; q < kRanks; ++q) {
        float av[V];
        lora::unpack<T>(araw[q], av);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[i * kRanks + q] = fmaf(av[e], xv[e], acc[i * kRanks + q]);
      }
    }
  }
}

// The same sums element by element, for x or A not aligned or K not a multiple of the vector
// (rare: small test shapes, views): same k partition, so the same split of the work.
template <typename T>
__device__ __forceinline__ void dot_range_scalar(float (&acc)[32], const T* x, const int (&rows)[kLoraTileRows],
                                                 int nrows, const T* a, int64_t K, int nrank, int64_t k_begin,
                                                 int64_t k_end, int64_t step) {
  constexpr int V = kVec<T>;
  for (int64_t k = k_begin; k < k_end; k += step)
    for (int e = 0; e < V && k + e < k_end; ++e) {
      float xv[kLoraTileRows], av[kRanks];
#pragma unroll
      for (int i = 0; i < kLoraTileRows; ++i) xv[i] = i < nrows ? to_f(x[static_cast<int64_t>(rows[i]) * K + k + e]) : 0.f;
#pragma unroll
      for (int q = 0; q < kRanks; ++q) av[q] = q < nrank ? to_f(a[q * K + k + e]) : 0.f;
#pragma unroll
      for (int i = 0; i < kLoraTileRows; ++i)
#pragma unroll
        for (int q = 0; q < kRanks; ++q) acc[i * kRanks + q] = fmaf(av[q], xv[i], acc[i * kRanks + q]);
    }
}

// Rank group gi of the tile -> (module p, first rank j0), groups taken module by module.
__device__ __forceinline__ void group_of(int gi, const int (&ng)[kLoraMaxGroup], int& p, int& j0) {
  p = 0;
  if (gi >= ng[0]) {
    gi -= ng[0];
    p = 1;
    if (gi >= ng[1]) {
      gi -= ng[1];
      p = 2;
    }
  }
  j0 = gi * kRanks;
}

// Writes v for the group into part's first region, v[tile][row][kStride] (module p's ranks at
// p * kLoraMaxRank): directly when K is not split; else each (tile, split) writes its share into
// partials[split][tile][row][kStride] and the tile's last split to finish (a counter per tile,
// left at zero) sums the splits in split order into v. The expand then reads one v per row.
template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    lora_step_shrink_kernel(float* __restrict__ part,  // v | partials | counters (lora_shrink below)
                            const LoraEntry* __restrict__ table,
                            const int32_t* __restrict__ words,  // header + tiles
                            const T* __restrict__ x,            // [T, K]
                            int64_t K, int max_tiles, int layer, int layers, int modules, GroupArgs g, bool x_vec) {
  constexpr int V = kVec<T>;
  __shared__ float red[kWarps][32];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ntiles = words[0];
  const LoraSplit sp = lora_split(K, ntiles, 32 * V);
  const LoraTile* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  float* const vout = part;                                                  // [max_tiles][rows][kStride]
  float* const parts = part + static_cast<int64_t>(max_tiles) * kLoraTileRows * kStride;  // [splits][ntiles][rows][kStride]
  int* const counters = reinterpret_cast<int*>(
      parts + static_cast<int64_t>(kLoraTargetItems + max_tiles) * kLoraTileRows * kStride);  // [max_tiles]
  const int64_t items = static_cast<int64_t>(ntiles) * sp.splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform
    const int tile = static_cast<int>(item / sp.splits), split = static_cast<int>(item % sp.splits);
    const LoraTile& tl = tiles[tile];
    const int nrows = tl.nrows;
    const LoraEntry* ent = table + (static_cast<int64_t>(tl.slot) * layers + layer) * modules;
    int rank[kLoraMaxGroup], ng[kLoraMaxGroup];
    const T* A[kLoraMaxGroup];
    int ng_all = 0;
#pragma unroll
    for (int p = 0; p < kLoraMaxGroup; ++p) {
      rank[p] = 0;
      A[p] = nullptr;
      if (p < g.count) {
        const LoraEntry& e = ent[g.module[p]];
        rank[p] = e.rank;
        A[p] = static_cast<const T*>(e.A);
      }
      ng[p] = (rank[p] + kRanks - 1) / kRanks;
      ng_all += ng[p];
    }
    if (ng_all == 0) continue;  // the adapter has none of these modules (every split skips: no counter)
    const int kw = ng_all >= kWarps ? 1 : kWarps / ng_all;  // warps per rank group (K parts)
    const int kp = warp % kw;
    const int64_t k0 = static_cast<int64_t>(split) * sp.chunk, k1 = min(K, k0 + sp.chunk);
    int rows[kLoraTileRows];
#pragma unroll
    for (int i = 0; i < kLoraTileRows; ++i) rows[i] = tl.rows[i < nrows ? i : 0];
    const int64_t k_lane = k0 + (static_cast<int64_t>(kp) * 32 + lane) * V, k_step = static_cast<int64_t>(kw) * 32 * V;
    // This split's v values go straight to v when K is not split.
    float* const out = sp.splits == 1 ? vout + static_cast<int64_t>(tile) * kLoraTileRows * kStride
                                      : parts + (static_cast<int64_t>(split) * ntiles + tile) * kLoraTileRows * kStride;

    for (int gi = warp / kw; gi < ng_all; gi += kWarps / kw) {  // warp-uniform
      int p, j0;
      group_of(gi, ng, p, j0);
      const int r = p == 0 ? rank[0] : p == 1 ? rank[1] : rank[2];
      const T* a = p == 0 ? A[0] : p == 1 ? A[1] : A[2];
      const int nrank = min(kRanks, r - j0);
      const T* a0 = a + static_cast<int64_t>(j0) * K;  // rank j0 + q at a0 + q K, q < nrank
      float acc[32];
#pragma unroll
      for (int q = 0; q < 32; ++q) acc[q] = 0.f;
      if (x_vec && lora::is_aligned16(a))
        dot_range_vec<T>(acc, x, rows, nrows, a0, K, nrank, k_lane, k1, k_step);
      else
        dot_range_scalar<T>(acc, x, rows, nrows, a0, K, nrank, k_lane, k1, k_step);
      lora::ReduceScatter<16>::step(acc, lane);  // lane l: row l / kRanks, rank j0 + l % kRanks
      if (kw == 1) {
        const int i = lane / kRanks, j = j0 + lane % kRanks;
        if (i < nrows && j < r) out[i * kStride + p * kLoraMaxRank + j] = acc[0];
      } else {
        red[warp][lane] = acc[0];
      }
    }
    if (kw > 1) {  // block-uniform; each warp had at most one group
      __syncthreads();
      const int gi = warp / kw;
      if (kp == 0 && gi < ng_all) {
        int p, j0;
        group_of(gi, ng, p, j0);
        const int r = p == 0 ? rank[0] : p == 1 ? rank[1] : rank[2];
        float s = 0.f;
        for (int q = 0; q < kw; ++q) s += red[warp + q][lane];  // K parts in order
        const int i = lane / kRanks, j = j0 + lane % kRanks;
        if (i < nrows && j < r) out[i * kStride + p * kLoraMaxRank + j] = s;
      }
      __syncthreads();  // red is reused by the next item
    }
    if (sp.splits > 1) {  // block-uniform: the tile's last split sums them (threadFenceReduction)
      __threadfence();    // this block's partials are visible before its arrival is counted
      __syncthreads();
      if (threadIdx.x == 0) last = atomicAdd(&counters[tile], 1) == sp.splits - 1;
      __syncthreads();
      if (last) {
        __threadfence();
        const int r_all = rank[0] + rank[1] + rank[2];
        const float* pt = parts + static_cast<int64_t>(tile) * kLoraTileRows * kStride;
        const int64_t split_stride = static_cast<int64_t>(ntiles) * kLoraTileRows * kStride;
        for (int q = threadIdx.x; q < nrows * r_all; q += kThreads) {
          const int i = q / r_all;
          int c = q % r_all, p = 0;
          if (c >= rank[0]) {
            c -= rank[0];
            p = 1;
            if (c >= rank[1]) {
              c -= rank[1];
              p = 2;
            }
          }
          const int64_t at = static_cast<int64_t>(i) * kStride + p * kLoraMaxRank + c;
          float s = 0.f;
#pragma unroll 8
          for (int k = 0; k < sp.splits; ++k) s += __ldcg(pt + k * split_stride + at);  // L2: other SMs wrote them
          vout[static_cast<int64_t>(tile) * kLoraTileRows * kStride + at] = s;
        }
        if (threadIdx.x == 0) counters[tile] = 0;  // every split has arrived: ready for the next launch
      }
    }
  }
}

}  // namespace

void lora_shrink(Context& c, const LoraStep& step, int layer, const LoraGroup& g, const Tensor& x) {
  const char* op = "lora_shrink";
  lora_check_call(step, layer, g, x, g.k, op);
  expect(x, c.dtype, op, "x");
  QUILT_ASSERT(step.table.device() == Device::cuda && step.tiles.device() == Device::cuda &&
                   step.partials.device() == Device::cuda,
               "lora_shrink: the plan is not on the GPU");
  QUILT_ASSERT(!c.lora_forked, "lora_shrink: the previous group's shrink was not expanded");
  if (step.max_tiles == 0) return;
  const int64_t K = g.k;
  const int V = static_cast<int>(16 / dtype_size(c.dtype));
  const int64_t granule = 32 * V;
  // Items never exceed max_tiles x the most splits, nor kLoraTargetItems + max_tiles - 1 (lora_split).
  const int64_t max_splits = (K + granule - 1) / granule;
  const int64_t items = std::min<int64_t>(step.max_tiles * max_splits, kLoraTargetItems + step.max_tiles - 1);
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, 4 * int64_t{c.num_sms})));
  GroupArgs ga{};
  ga.count = g.count;
  for (int p = 0; p < g.count; ++p) ga.module[p] = g.module[p];
  const bool x_vec = K % V == 0 && aligned16(x.data());

  cudaStream_t s = c.stream;
  if (c.lora_overlap) {
    check(cudaEventRecord(c.lora_fork, c.stream), "lora_shrink: fork");
    check(cudaStreamWaitEvent(c.lora_stream, c.lora_fork, 0), "lora_shrink: fork");
    s = c.lora_stream;
  }
  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    lora_step_shrink_kernel<T_><<<grid, kThreads, 0, s>>>(
        step.partials.as<float>(), static_cast<const LoraEntry*>(step.table.data()), step.tiles.as<int32_t>(),
        x.as<T_>(), K, step.max_tiles, layer, step.layers, step.modules, ga, x_vec);
  });
  check_launch("lora_shrink");
  if (c.lora_overlap) {
    check(cudaEventRecord(c.lora_join, c.lora_stream), "lora_shrink: join");
    c.lora_forked = true;
  }
}

}  // namespace quilt::cuda
