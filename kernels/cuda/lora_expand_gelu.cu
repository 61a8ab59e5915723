// lora_expand fused with its consumer gelu_tanh_mul (the gate/up group): out = gelu_tanh(gate +
// dg) * (up + du) for every row, without writing gate_up back. The separate expand would read and
// write all of gate_up's tile rows once more (8 MB a layer for gemma-2b at 64 rows) and cost a
// kernel boundary; here the LoRA terms ride on the reads the activation makes anyway.
//
// Work items are (row group, 256-column chunk of I), a fixed grid striding over them (launch
// sized by step.max_tiles and step.max_rows): the groups are the plan's tiles (their adapter's
// gate and up B rows, v from lora_shrink as lora_expand reads it) and then the base rows in groups
// of 8 (the activation alone). Each thread owns one column of its rows. gate + dg and up + du are
// rounded to the storage dtype as lora_expand stores them, then the activation is that of
// gelu_tanh_mul.cu: the same numbers as the two ops in a row.
#include <algorithm>

#include "kernels/cuda/lora_common.cuh"
#include "kernels/cuda/ops.h"

namespace quilt::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kStride = kLoraMaxGroup * kLoraMaxRank;  // v floats per (tile, row)

// gelu_tanh(g) * u in fp32, as gelu_tanh_mul.cu.
__device__ __forceinline__ float gelu_mul(float g, float u) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * u;
}

// acc[i] += B[o] . vs[i] for the tile's rows (B [N, r], row o of this thread).
template <typename T>
__device__ __forceinline__ void dot_b(float (&acc)[kLoraTileRows], const T* B, int64_t o, int r, int nrows,
                                      const float (&vs)[kLoraTileRows][kLoraMaxRank]) {
  constexpr int V = kVec<T>;
  const T* b = B + o * r;
  const bool b_vec = r % V == 0 && lora::is_aligned16(B);
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
            for (int e = 0; e < V; ++e) acc[i] = fmaf(bv[e], vs[i][jv + e], acc[i]);
          }
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_step_expand_gelu_kernel(T* __restrict__ out,            // [T, I]
                                 const T* __restrict__ gate_up,  // [T, 2 I]
                                 int64_t I, const float* __restrict__ part, const LoraEntry* __restrict__ table,
                                 const int32_t* __restrict__ words,  // header + tiles + base rows
                                 int layer, int layers, int modules, int mod_gate, int mod_up) {
  __shared__ float vs[2][kLoraTileRows][kLoraMaxRank];  // gate's and up's v of the tile's rows
  const int ntiles = words[0], nbase = words[1];
  const LoraTile* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  const int32_t* base = words + kLoraHeaderInts + static_cast<int64_t>(ntiles) * kLoraTileInts;
  const int64_t nchunks = (I + kThreads - 1) / kThreads;
  const int64_t groups = ntiles + (nbase + kLoraTileRows - 1) / kLoraTileRows;
  const int64_t items = groups * nchunks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform
    const int64_t grp = item / nchunks;
    const int64_t o = (item % nchunks) * kThreads + threadIdx.x;
    const bool active = o < I;
    if (grp >= ntiles) {  // base rows: the activation alone
      const int64_t b0 = (grp - ntiles) * kLoraTileRows;
      const int n = static_cast<int>(min(static_cast<int64_t>(kLoraTileRows), nbase - b0));
      if (active)
        for (int i = 0; i < n; ++i) {
          const int64_t row = base[b0 + i];
          const T* gu = gate_up + row * 2 * I;
          out[row * I + o] = from_f<T>(gelu_mul(to_f(gu[o]), to_f(gu[I + o])));
        }
      continue;
    }
    const LoraTile& tl = tiles[grp];
    const int nrows = tl.nrows;
    const LoraEntry* ent = table + (static_cast<int64_t>(tl.slot) * layers + layer) * modules;
    const LoraEntry& eg = ent[mod_gate];
    const LoraEntry& eu = ent[mod_up];
    const int rg = eg.rank, ru = eu.rank;
    float gv[kLoraTileRows], uv[kLoraTileRows];  // loaded first: their latency overlaps v's
#pragma unroll
    for (int i = 0; i < kLoraTileRows; ++i) {
      gv[i] = uv[i] = 0.f;
      if (active && i < nrows) {
        const T* gu = gate_up + static_cast<int64_t>(tl.rows[i]) * 2 * I;
        gv[i] = to_f(gu[o]);
        uv[i] = to_f(gu[I + o]);
      }
    }
    const float* v = part + static_cast<int64_t>(grp) * kLoraTileRows * kStride;
    for (int q = threadIdx.x; q < 2 * nrows * kLoraMaxRank; q += kThreads) {
      const int m = q / (nrows * kLoraMaxRank), rest = q % (nrows * kLoraMaxRank);
      const int i = rest / kLoraMaxRank, j = rest % kLoraMaxRank;
      vs[m][i][j] = j < (m == 0 ? rg : ru) ? v[i * kStride + m * kLoraMaxRank + j] : 0.f;
    }
    __syncthreads();
    if (active) {
      if (rg > 0) {  // as lora_expand: gate + dg rounded once
        float acc[kLoraTileRows];
#pragma unroll
        for (int i = 0; i < kLoraTileRows; ++i) acc[i] = 0.f;
        dot_b<T>(acc, static_cast<const T*>(eg.B), o, rg, nrows, vs[0]);
#pragma unroll
        for (int i = 0; i < kLoraTileRows; ++i) gv[i] = to_f(from_f<T>(gv[i] + acc[i]));
      }
      if (ru > 0) {
        float acc[kLoraTileRows];
#pragma unroll
        for (int i = 0; i < kLoraTileRows; ++i) acc[i] = 0.f;
        dot_b<T>(acc, static_cast<const T*>(eu.B), o, ru, nrows, vs[1]);
#pragma unroll
        for (int i = 0; i < kLoraTileRows; ++i) uv[i] = to_f(from_f<T>(uv[i] + acc[i]));
      }
#pragma unroll
      for (int i = 0; i < kLoraTileRows; ++i)
        if (i < nrows) out[static_cast<int64_t>(tl.rows[i]) * I + o] = from_f<T>(gelu_mul(gv[i], uv[i]));
    }
    __syncthreads();  // vs is rewritten by the next item
  }
}

}  // namespace

void lora_expand_gelu(Context& c, const LoraStep& step, int layer, const LoraGroup& g, const Tensor& gate_up,
                      Tensor& out) {
  const char* op = "lora_expand_gelu";
  lora_check_call(step, layer, g, gate_up, gate_up.dim(1), op);
  expect(gate_up, c.dtype, op, "gate_up");
  expect(out, c.dtype, op, "out");
  const int64_t T = gate_up.dim(0), I = out.dim(1);
  QUILT_ASSERT(out.rank() == 2 && out.dim(0) == T && gate_up.dim(1) == 2 * I && g.count == 2 && g.col[0] == 0 &&
                   g.n[0] == I && g.col[1] == I && g.n[1] == I,
               "lora_expand_gelu: ", out.describe(), " of ", gate_up.describe(), " with modules at ", g.col[0], " and ",
               g.col[1]);
  QUILT_ASSERT(step.max_rows >= T, "lora_expand_gelu: a plan for ", step.max_rows, " rows cannot cover ", T);
  if (c.lora_forked) {  // the shrink ran on the LoRA stream: wait for it
    check(cudaStreamWaitEvent(c.stream, c.lora_join, 0), "lora_expand_gelu: join");
    c.lora_forked = false;
  }
  if (T == 0 || I == 0) return;
  const int64_t nchunks = (I + kThreads - 1) / kThreads;
  const int64_t items = (step.max_tiles + (step.max_rows + kLoraTileRows - 1) / kLoraTileRows) * nchunks;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, 8 * int64_t{c.num_sms})));
  dispatch(c.dtype, op, [&](auto tag) {
    using T_ = decltype(tag);
    lora_step_expand_gelu_kernel<T_><<<grid, kThreads, 0, c.stream>>>(
        out.as<T_>(), gate_up.as<T_>(), I, step.partials.as<float>(), static_cast<const LoraEntry*>(step.table.data()),
        step.tiles.as<int32_t>(), layer, step.layers, step.modules, g.module[0], g.module[1]);
  });
  check_launch(op);
}

}  // namespace quilt::cuda
