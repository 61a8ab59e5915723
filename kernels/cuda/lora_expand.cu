// Multi-LoRA expand of a step (lora_plan.h): y[rows, col + o] += B[o] . v[row] for every tile and
// module of the group, v from lora_shrink (the front of the partials, already summed over K
// splits). Joins the shrink's stream first (lora_shrink.cu). Launch sized by step.max_tiles
// alone, as the shrink's.
//
// Work items are (tile, 256-column chunk of one module's output); a fixed grid strides over them.
// The block reads the tile rows' v into shared memory; each thread owns one output column: it
// reads its B row (r values, 16-byte vectors when aligned), dots it with each tile row's v and
// adds to y with one rounding. Its y values are loaded first, so that their latency overlaps v's.
#include <algorithm>

#include "kernels/cuda/lora_common.cuh"
#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kStride = kLoraMaxGroup * kLoraMaxRank;  // partial floats per (split, tile, row)

struct GroupArgs {
  int count;
  int module[kLoraMaxGroup];
  int64_t col[kLoraMaxGroup];
  int64_t n[kLoraMaxGroup];
  int chunk_begin[kLoraMaxGroup + 1];  // first chunk of each module; [count..] = total chunks
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_step_expand_kernel(T* __restrict__ y, int64_t ldy,  // [T, ldy]
                            const float* __restrict__ part, const LoraEntry* __restrict__ table,
                            const int32_t* __restrict__ words,  // header + tiles
                            int layer, int layers, int modules, GroupArgs g) {
  constexpr int V = kVec<T>;
  __shared__ float vs[kLoraTileRows][kLoraMaxRank];  // v of the tile's rows, zero past the rank
  const int ntiles = words[0];
  const LoraTile* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  const int nchunks = g.chunk_begin[kLoraMaxGroup];
  const int64_t items = static_cast<int64_t>(ntiles) * nchunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform
    const int tile = static_cast<int>(item / nchunks), c = static_cast<int>(item % nchunks);
    const int p = (c >= g.chunk_begin[1] ? 1 : 0) + (c >= g.chunk_begin[2] ? 1 : 0);
    const LoraTile& tl = tiles[tile];
    const int nrows = tl.nrows;
    const int module = p == 0 ? g.module[0] : p == 1 ? g.module[1] : g.module[2];
    const LoraEntry& e = table[(static_cast<int64_t>(tl.slot) * layers + layer) * modules + module];
    const int r = e.rank;
    if (r == 0) continue;  // the adapter does not touch this module
    const int64_t N = p == 0 ? g.n[0] : p == 1 ? g.n[1] : g.n[2];
    const int64_t col = p == 0 ? g.col[0] : p == 1 ? g.col[1] : g.col[2];
    const int cb = p == 0 ? g.chunk_begin[0] : p == 1 ? g.chunk_begin[1] : g.chunk_begin[2];
    const int64_t o = static_cast<int64_t>(c - cb) * kThreads + threadIdx.x;
    const bool active = o < N;

    float yv[kLoraTileRows];
#pragma unroll
    for (int i = 0; i < kLoraTileRows; ++i)
      yv[i] = active && i < nrows ? to_f(y[static_cast<int64_t>(tl.rows[i]) * ldy + col + o]) : 0.f;

    const float* v = part + static_cast<int64_t>(tile) * kLoraTileRows * kStride + p * kLoraMaxRank;
    for (int q = threadIdx.x; q < nrows * kLoraMaxRank; q += kThreads) {
      const int i = q / kLoraMaxRank, j = q % kLoraMaxRank;
      vs[i][j] = j < r ? v[i * kStride + j] : 0.f;
    }
    __syncthreads();
    if (active) {
      const T* B = static_cast<const T*>(e.B);
      const T* b = B + o * r;
      const bool b_vec = r % V == 0 && lora::is_aligned16(B);
      float acc[kLoraTileRows];
#pragma unroll
      for (int i = 0; i < kLoraTileRows; ++i) acc[i] = 0.f;
      constexpr int kBatch = 4;  // B vectors in flight per thread
      for (int j = 0; j < r; j += kBatch * V) {  // j + kBatch * V <= kLoraMaxRank: r <= kLoraMaxRank, j % (kBatch * V) == 0
        uint4 braw[kBatch];
#pragma unroll
        for (int jj = 0; jj < kBatch; ++jj) {
          const int jv = j + jj * V;
          braw[jj] = make_uint4(0u, 0u, 0u, 0u);
          if (jv < r) braw[jj] = b_vec ? lora::load_raw<T, true>(b + jv, V) : lora::load_raw<T, false>(b + jv, r - jv);
        }
#pragma unroll
        for (int jj = 0; jj < kBatch; ++jj) {
          const int jv = j + jj * V;
          if (jv < r) {
            float bv[V];
            lora::unpack<T>(braw[jj], bv);
#pragma unroll
            for (int i = 0; i < kLoraTileRows; ++i) {
              if (i < nrows) {
#pragma unroll
                for (int ee = 0; ee < V; ++ee) acc[i] = fmaf(bv[ee], vs[i][jv + ee], acc[i]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kLoraTileRows; ++i)
        if (i < nrows) y[static_cast<int64_t>(tl.rows[i]) * ldy + col + o] = from_f<T>(yv[i] + acc[i]);
    }
    __syncthreads();  // vs is rewritten by the next item
  }
}

}  // namespace

void lora_expand(Context& c, const LoraStep& step, int layer, const LoraGroup& g, Tensor& y) {
  const char* op = "lora_expand";
  lora_check_call(step, layer, g, y, y.dim(1), op);
  expect(y, c.dtype, op, "y");
  const int64_t ldy = y.dim(1);
  GroupArgs ga{};
  ga.count = g.count;
  int chunks = 0;
  for (int p = 0; p < g.count; ++p) {
    QUILT_ASSERT(g.col[p] + g.n[p] <= ldy, "lora_expand: module ", p, " columns [", g.col[p], ", ", g.col[p] + g.n[p],
                 ") outside y ", y.describe());
    ga.module[p] = g.module[p];
    ga.col[p] = g.col[p];
    ga.n[p] = g.n[p];
    ga.chunk_begin[p] = chunks;
    const int64_t nc = (g.n[p] + kThreads - 1) / kThreads;
    QUILT_REQUIRE(chunks + nc < (int64_t{1} << 30), "lora_expand: output width ", g.n[p], " is too wide");
    chunks += static_cast<int>(nc);
  }
  for (int p = g.count; p <= kLoraMaxGroup; ++p) ga.chunk_begin[p] = chunks;

  if (c.lora_forked) {  // the shrink ran on the LoRA stream: wait for it
    check(cudaStreamWaitEvent(c.stream, c.lora_join, 0), "lora_expand: join");
    c.lora_forked = false;
  }
  if (step.max_tiles == 0) return;
  const int64_t items = static_cast<int64_t>(step.max_tiles) * chunks;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, 8 * int64_t{c.num_sms})));
  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    lora_step_expand_kernel<T_><<<grid, kThreads, 0, c.stream>>>(
        y.as<T_>(), ldy, step.partials.as<float>(), static_cast<const LoraEntry*>(step.table.data()),
        step.tiles.as<int32_t>(), layer, step.layers, step.modules, ga);
  });
  check_launch("lora_expand");
}

}  // namespace quilt::cuda
