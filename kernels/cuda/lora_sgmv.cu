// Multi-LoRA (SGMV/BGMV) for decode and prefill: y[rows, col : col + N] += (x[rows] A^T) B^T for
// each segment of each problem, with v = x A^T kept in fp32. Two launches per call whatever the
// number of problems (modules sharing x and y), segments and adapters:
//
//  1. shrink: grid (tile, K split). A tile is up to RG rows of one adapter of one problem (rows
//     of every segment of that adapter are gathered, so a decode batch with one row per
//     sequence still reads each adapter's A once per RG rows, not once per row). The block's 256
//     threads stride its K range in 16-byte vectors of x and A; each thread keeps RG x RJ = 32
//     fp32 dot products (RJ ranks at a time), a reduce-scatter over the warp's lanes (31 shuffles)
//     leaves one per lane, the 8 warps meet in shared memory, and the split's partial v goes to
//     scratch. K is split only when there are too few tiles to fill the GPU (decode, small batch).
//  2. expand: grid (tile, 256-column chunk of N). The block sums the K splits' partials in split
//     order (deterministic) into v in shared memory; each thread owns one output column: it reads
//     its B row (r values, 16-byte vectors when aligned), dots it with each tile row's v and adds
//     to y with one rounding.
//
// Tiles and adapters are planned on the host, packed into one table and uploaded through the
// backend's pinned staging (no synchronisation) into the op's scratch, followed by the partials.
// Why not cuBLAS for prefill: a GEMM per segment and module is a launch each, and the shapes are
// thin (the shrink has N = r <= 128, the expand K = r), so they are bound by reading x, A, B and
// y, not by arithmetic. These CUDA-core kernels read y once, x once per problem and A / B once per
// tile (from L2 after the first tile), and also cover f32 (no TF32: the f32 mode must match the
// CPU). Tensor cores (mma) for the shrink of long prefill segments are the next step if the
// benchmark shows it compute-bound there.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cuda/lora_common.cuh"
#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kThreads = 256;  // both kernels
constexpr int kMaxRows = 8;    // rows per tile (the largest RG)
constexpr int kMaxRank = 128;
constexpr int kMaxSplits = 32;  // K splits of the shrink (the expand sums this many partials)

// One adapter of one problem (device table; same layout on host and device).
struct Group {
  const void* A;  // [r, K]
  const void* B;  // [N, r]
  int64_t col;    // first column of y
  int32_t rank, N;
  int32_t b_vec;  // B's rows can be read as 16-byte vectors (aligned, r a multiple of the vector)
  int32_t pad;
};
static_assert(sizeof(Group) == 40, "Group layout");

// Up to kMaxRows rows of x / y using one group.
struct Tile {
  int32_t group, nrows;
  int32_t rows[kMaxRows];
};
static_assert(sizeof(Tile) == 40, "Tile layout");

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

using lora::load_raw;
using lora::ReduceScatter;
using lora::unpack;

// part[split][tile][row][rstride]: this split's share of v = x A^T for the tile's rows (rows
// past the tile's count repeat its last row; their values are never read).
template <typename T, int RG, bool Vec>
__global__ void __launch_bounds__(kThreads)
    lora_shrink_kernel(float* __restrict__ part, const Group* __restrict__ groups,
                       const Tile* __restrict__ tiles, const T* __restrict__ x,  // [T, K]
                       int64_t K, int64_t chunk, int rstride) {
  constexpr int V = kVec<T>;
  constexpr int RJ = 32 / RG;  // ranks per pass
  constexpr int kBatch = RJ < 16 ? RJ : 16;
  __shared__ float red[kThreads / 32][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tile = blockIdx.x;
  const Tile& tl = tiles[tile];
  const int nrows = tl.nrows;
  const Group& g = groups[tl.group];
  const int r = g.rank;
  const T* A = static_cast<const T*>(g.A);
  const T* xr[RG];
#pragma unroll
  for (int i = 0; i < RG; ++i) xr[i] = x + static_cast<int64_t>(tl.rows[i < nrows ? i : nrows - 1]) * K;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t k_end = min(K, k_begin + chunk);
  float* out = part + ((static_cast<int64_t>(blockIdx.y) * gridDim.x + tile) * kMaxRows) * rstride;

  for (int j0 = 0; j0 < r; j0 += RJ) {  // block-uniform
    float acc[32];
#pragma unroll
    for (int q = 0; q < 32; ++q) acc[q] = 0.f;
    for (int64_t k = k_begin + static_cast<int64_t>(threadIdx.x) * V; k < k_end; k += kThreads * V) {
      const int64_t valid = k_end - k;
      float xv[RG][V];
#pragma unroll
      for (int i = 0; i < RG; ++i) unpack<T>(load_raw<T, Vec>(xr[i] + k, valid), xv[i]);
      // A's rows in batches of loads issued together (no branch between them: ranks past r load
      // nothing and multiply zeros).
#pragma unroll
      for (int jb = 0; jb < RJ; jb += kBatch) {
        uint4 araw[kBatch];
#pragma unroll
        for (int jj = 0; jj < kBatch; ++jj) {
          const int j = j0 + jb + jj;
          araw[jj] = make_uint4(0u, 0u, 0u, 0u);
          if (j < r) araw[jj] = load_raw<T, Vec>(A + static_cast<int64_t>(j) * K + k, valid);
        }
#pragma unroll
        for (int jj = 0; jj < kBatch; ++jj) {
          float av[V];
          unpack<T>(araw[jj], av);
#pragma unroll
          for (int i = 0; i < RG; ++i)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[i * RJ + jb + jj] = fmaf(av[e], xv[i][e], acc[i * RJ + jb + jj]);
        }
      }
    }
    ReduceScatter<16>::step(acc, lane);  // lane l: the warp's sum of value l = (row l / RJ, rank l % RJ)
    red[warp][lane] = acc[0];
    __syncthreads();
    if (warp == 0) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) s += red[w][lane];
      const int i = lane / RJ, j = j0 + lane % RJ;
      if (j < r) out[i * rstride + j] = s;
    }
    __syncthreads();  // red is reused by the next pass
  }
}

// y[rows, col + o] += B[o] . v[row] for the block's 256 columns o of the tile's group.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_expand_kernel(T* __restrict__ y, int64_t ldy, const float* __restrict__ part,
                       const Group* __restrict__ groups, const Tile* __restrict__ tiles, int splits,
                       int rstride) {
  constexpr int V = kVec<T>;
  __shared__ float vs[kMaxRows][kMaxRank];  // v of the tile's rows, zero past the rank
  const int64_t tile = blockIdx.x;
  const Tile& tl = tiles[tile];
  const Group& g = groups[tl.group];
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kThreads;
  if (o0 >= g.N) return;  // block-uniform: this group's N is narrower than the grid's widest
  const int r = g.rank, nrows = tl.nrows;
  const int64_t split_stride = static_cast<int64_t>(gridDim.x) * kMaxRows * rstride;
  const float* p = part + tile * kMaxRows * rstride;
  for (int q = threadIdx.x; q < nrows * kMaxRank; q += kThreads) {
    const int i = q / kMaxRank, j = q % kMaxRank;
    float s = 0.f;
    if (j < r)
      for (int sp = 0; sp < splits; ++sp) s += p[sp * split_stride + i * rstride + j];
    vs[i][j] = s;
  }
  __syncthreads();
  const int64_t o = o0 + threadIdx.x;
  if (o >= g.N) return;  // no barrier follows
  const T* b = static_cast<const T*>(g.B) + o * r;
  float acc[kMaxRows];
#pragma unroll
  for (int i = 0; i < kMaxRows; ++i) acc[i] = 0.f;
  constexpr int kBatch = 4;  // B vectors in flight per thread
  for (int j = 0; j < r; j += kBatch * V) {  // j + kBatch * V <= kMaxRank: r <= kMaxRank, j % (kBatch * V) == 0
    uint4 braw[kBatch];
#pragma unroll
    for (int jj = 0; jj < kBatch; ++jj) {
      const int jv = j + jj * V;
      braw[jj] = make_uint4(0u, 0u, 0u, 0u);
      if (jv < r) braw[jj] = g.b_vec ? load_raw<T, true>(b + jv, V) : load_raw<T, false>(b + jv, r - jv);
    }
#pragma unroll
    for (int jj = 0; jj < kBatch; ++jj) {
      const int jv = j + jj * V;
      if (jv < r) {  // block-uniform
        float bv[V];
        unpack<T>(braw[jj], bv);
#pragma unroll
        for (int i = 0; i < kMaxRows; ++i) {
          if (i < nrows) {  // block-uniform
#pragma unroll
            for (int e = 0; e < V; ++e) acc[i] = fmaf(bv[e], vs[i][jv + e], acc[i]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxRows; ++i) {
    if (i < nrows) {
      T* yp = y + static_cast<int64_t>(tl.rows[i]) * ldy + g.col + o;
      *yp = from_f<T>(to_f(*yp) + acc[i]);
    }
  }
}

template <typename T, int RG>
void launch_shrink(bool vec, dim3 grid, cudaStream_t s, float* part, const Group* groups, const Tile* tiles,
                   const T* x, int64_t K, int64_t chunk, int rstride) {
  if (vec)
    lora_shrink_kernel<T, RG, true><<<grid, kThreads, 0, s>>>(part, groups, tiles, x, K, chunk, rstride);
  else
    lora_shrink_kernel<T, RG, false><<<grid, kThreads, 0, s>>>(part, groups, tiles, x, K, chunk, rstride);
}

}  // namespace

void lora_sgmv(Context& c, Tensor& y, const Tensor& x, const std::vector<LoraProblem>& problems,
               const StageUpload& upload) {
  const char* op = "lora_sgmv";
  expect(x, c.dtype, op, "x");
  expect(y, c.dtype, op, "y");
  QUILT_ASSERT(x.rank() == 2 && y.rank() == 2 && x.dim(0) == y.dim(0), "lora_sgmv: x ", x.describe(), " y ",
               y.describe());
  const int64_t T = x.dim(0), K = x.dim(1), ldy = y.dim(1);
  const size_t esize = dtype_size(c.dtype);
  const int V = static_cast<int>(16 / esize);

  // ---- plan: groups (adapter x problem) and tiles of up to RG rows of one group ----------------
  std::vector<Group> groups;
  std::vector<std::vector<int32_t>> group_rows;
  std::vector<std::pair<int64_t, int64_t>> col_ranges;  // per problem with work: [col, col + max N)
  std::vector<std::pair<int32_t, int32_t>> spans;
  int max_rank = 0;
  int64_t max_n = 0;
  bool a_vec = (K % V) == 0 && aligned16(x.data());
  for (size_t pi = 0; pi < problems.size(); ++pi) {
    const LoraProblem& prob = problems[pi];
    const int64_t col = prob.col_offset;
    const size_t first_group = groups.size();
    int64_t prob_n = 0;
    spans.clear();
    for (const LoraSegment& s : prob.segments) {
      if (s.row_end <= s.row_begin) continue;
      QUILT_ASSERT(s.A && s.B, "lora_sgmv: segment without factors");
      QUILT_ASSERT(s.row_begin >= 0 && s.row_end <= T, "lora_sgmv: segment rows [", s.row_begin, ", ", s.row_end,
                   ") outside x ", x.describe());
      const int64_t r = s.A->dim(0), N = s.B->dim(0);
      QUILT_ASSERT(s.A->rank() == 2 && s.B->rank() == 2 && s.A->dim(1) == K && s.B->dim(1) == r && col >= 0 &&
                       col + N <= ldy,
                   "LoRA shapes: x ", x.describe(), " A ", s.A->describe(), " B ", s.B->describe(), " y ",
                   y.describe(), " at column ", col);
      expect(*s.A, c.dtype, op, "A");
      expect(*s.B, c.dtype, op, "B");
      QUILT_REQUIRE(r <= kMaxRank, "lora_sgmv (cuda): adapter rank ", r, " is above the kernel's limit of ",
                    kMaxRank);
      spans.emplace_back(s.row_begin, s.row_end);
      if (r == 0 || N == 0) continue;  // adds nothing
      size_t gi = first_group;
      while (gi < groups.size() && !(groups[gi].A == s.A->data() && groups[gi].B == s.B->data())) ++gi;
      if (gi == groups.size()) {
        const bool b_vec = (r % V) == 0 && aligned16(s.B->data());
        groups.push_back(Group{s.A->data(), s.B->data(), col, static_cast<int32_t>(r), static_cast<int32_t>(N),
                               b_vec ? 1 : 0, 0});
        group_rows.emplace_back();
        a_vec = a_vec && aligned16(s.A->data());
        max_rank = std::max<int>(max_rank, static_cast<int>(r));
        max_n = std::max(max_n, N);
        prob_n = std::max(prob_n, N);
      }
      for (int32_t t = s.row_begin; t < s.row_end; ++t) group_rows[gi].push_back(t);
    }
    // Concurrent tiles write y without atomics: a problem's segments must not share rows, and
    // problems must not share columns.
    std::sort(spans.begin(), spans.end());
    for (size_t k = 1; k < spans.size(); ++k)
      QUILT_REQUIRE(spans[k].first >= spans[k - 1].second, "lora_sgmv: segments [", spans[k - 1].first, ", ",
                    spans[k - 1].second, ") and [", spans[k].first, ", ", spans[k].second, ") overlap");
    if (prob_n > 0) {
      for (const auto& cr : col_ranges)
        QUILT_REQUIRE(col + prob_n <= cr.first || cr.second <= col, "lora_sgmv_multi: problem ", pi,
                      " writes columns [", col, ", ", col + prob_n, ") that another problem also writes [",
                      cr.first, ", ", cr.second, ")");
      col_ranges.emplace_back(col, col + prob_n);
    }
  }
  if (groups.empty() || K == 0) return;  // nothing to add (K == 0: v = 0)

  size_t max_group_rows = 0;
  for (const auto& rows : group_rows) max_group_rows = std::max(max_group_rows, rows.size());
  const int RG = max_group_rows <= 1 ? 1 : max_group_rows <= 4 ? 4 : 8;
  std::vector<Tile> tiles;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& rows = group_rows[gi];
    for (size_t b = 0; b < rows.size(); b += RG) {
      Tile t{};
      t.group = static_cast<int32_t>(gi);
      t.nrows = static_cast<int32_t>(std::min<size_t>(RG, rows.size() - b));
      for (int i = 0; i < t.nrows; ++i) t.rows[i] = rows[b + i];
      tiles.push_back(t);
    }
  }
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  QUILT_REQUIRE(ntiles < (int64_t{1} << 31), "lora_sgmv: ", ntiles, " tiles is too many for one launch");

  // K splits: enough blocks for ~2 waves when tiles are few, each block covering at least one
  // 16-byte vector per thread.
  const int64_t step = int64_t{kThreads} * V;
  const int64_t max_splits = (K + step - 1) / step;
  const int64_t want = (2 * int64_t{c.num_sms} + ntiles - 1) / ntiles;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({max_splits, kMaxSplits, want}));
  const int64_t chunk = ((K + splits - 1) / splits + step - 1) / step * step;
  splits = (K + chunk - 1) / chunk;
  const int rstride = (max_rank + 3) / 4 * 4;
  const int64_t n_chunks = (max_n + kThreads - 1) / kThreads;
  QUILT_REQUIRE(n_chunks < 65536, "lora_sgmv: output width ", max_n, " is too wide for the expand grid");

  // ---- one upload (groups | tiles) into scratch, followed by the partials ----------------------
  const size_t groups_bytes = groups.size() * sizeof(Group), tiles_bytes = tiles.size() * sizeof(Tile);
  const size_t table_bytes = align256(groups_bytes) + align256(tiles_bytes);
  const size_t part_bytes = static_cast<size_t>(splits) * ntiles * kMaxRows * rstride * sizeof(float);
  char* base = static_cast<char*>(c.scratch(table_bytes + part_bytes, op));
  std::vector<char> table(table_bytes, 0);
  std::memcpy(table.data(), groups.data(), groups_bytes);
  std::memcpy(table.data() + align256(groups_bytes), tiles.data(), tiles_bytes);
  upload(base, table.data(), table_bytes);
  const Group* d_groups = reinterpret_cast<const Group*>(base);
  const Tile* d_tiles = reinterpret_cast<const Tile*>(base + align256(groups_bytes));
  float* part = reinterpret_cast<float*>(base + table_bytes);

  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    const dim3 sgrid(static_cast<unsigned>(ntiles), static_cast<unsigned>(splits));
    const T_* xp = x.as<T_>();
    switch (RG) {
      case 1: launch_shrink<T_, 1>(a_vec, sgrid, c.stream, part, d_groups, d_tiles, xp, K, chunk, rstride); break;
      case 4: launch_shrink<T_, 4>(a_vec, sgrid, c.stream, part, d_groups, d_tiles, xp, K, chunk, rstride); break;
      default: launch_shrink<T_, 8>(a_vec, sgrid, c.stream, part, d_groups, d_tiles, xp, K, chunk, rstride); break;
    }
    check_launch("lora_sgmv: shrink");
    const dim3 egrid(static_cast<unsigned>(ntiles), static_cast<unsigned>(n_chunks));
    lora_expand_kernel<T_><<<egrid, kThreads, 0, c.stream>>>(y.as<T_>(), ldy, part, d_groups, d_tiles,
                                                             static_cast<int>(splits), rstride);
    check_launch("lora_sgmv: expand");
  });
}

}  // namespace quilt::cuda
