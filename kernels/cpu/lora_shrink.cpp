#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// v = x[row] A^T for every tile row and module of the group, into partials laid out as
// [tile][row][kLoraMaxGroup * kLoraMaxRank] (module p's v at p * kLoraMaxRank). Same loops, and
// so the same fp32 results, as lora_sgmv.
void lora_shrink(const LoraStep& step, int layer, const LoraGroup& g, const Tensor& x) {
  lora_check_call(step, layer, g, x, g.k, "lora_shrink");
  const int64_t T = x.dim(0), K = g.k;
  const int32_t* words = step.tiles.as<int32_t>();
  const int ntiles = words[0];
  QUILT_ASSERT(ntiles >= 0 && ntiles <= step.max_tiles, "lora_shrink: ", ntiles, " tiles in a plan for ",
               step.max_tiles);
  const auto* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  const auto* table = reinterpret_cast<const LoraEntry*>(step.table.data());
  float* part = step.partials.as<float>();
  for (int t = 0; t < ntiles; ++t) {
    const LoraTile& tile = tiles[t];
    QUILT_ASSERT(tile.slot >= 0 && tile.slot < step.table.dim(0) && tile.nrows >= 1 && tile.nrows <= kLoraTileRows);
    for (int p = 0; p < g.count; ++p) {
      const LoraEntry& e = table[(static_cast<int64_t>(tile.slot) * step.layers + layer) * step.modules + g.module[p]];
      if (e.rank == 0) continue;
      QUILT_ASSERT(e.rank > 0 && e.rank <= kLoraMaxRank && e.A, "lora_shrink: entry of rank ", e.rank);
      const float* A = static_cast<const float*>(e.A);
      for (int i = 0; i < tile.nrows; ++i) {
        const int32_t row = tile.rows[i];
        QUILT_ASSERT(row >= 0 && row < T, "lora_shrink: row ", row, " outside x ", x.describe());
        const float* xr = x.as<float>() + row * K;
        float* v = part + (static_cast<int64_t>(t) * kLoraTileRows + i) * (kLoraMaxGroup * kLoraMaxRank) +
                   p * kLoraMaxRank;
        for (int64_t k = 0; k < e.rank; ++k) {
          const float* a = A + k * K;
          float acc = 0;
          for (int64_t j = 0; j < K; ++j) acc += a[j] * xr[j];
          v[k] = acc;
        }
      }
    }
  }
}

}  // namespace quilt::cpu
