#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// y[row, col + o] += B[o] . v for every tile row and module of the group, v from lora_shrink's
// partials. Same loops, and so the same fp32 results, as lora_sgmv.
void lora_expand(const LoraStep& step, int layer, const LoraGroup& g, Tensor& y) {
  lora_check_call(step, layer, g, y, y.dim(1), "lora_expand");
  const int64_t T = y.dim(0), ld_y = y.dim(1);
  for (int p = 0; p < g.count; ++p)
    QUILT_ASSERT(g.col[p] + g.n[p] <= ld_y, "lora_expand: module ", p, " columns [", g.col[p], ", ",
                 g.col[p] + g.n[p], ") outside y ", y.describe());
  const int32_t* words = step.tiles.as<int32_t>();
  const int ntiles = words[0];
  QUILT_ASSERT(ntiles >= 0 && ntiles <= step.max_tiles);
  const auto* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  const auto* table = reinterpret_cast<const LoraEntry*>(step.table.data());
  const float* part = step.partials.as<float>();
  for (int t = 0; t < ntiles; ++t) {
    const LoraTile& tile = tiles[t];
    for (int p = 0; p < g.count; ++p) {
      const LoraEntry& e = table[(static_cast<int64_t>(tile.slot) * step.layers + layer) * step.modules + g.module[p]];
      if (e.rank == 0) continue;
      QUILT_ASSERT(e.B, "lora_expand: entry without B");
      const float* B = static_cast<const float*>(e.B);
      const int64_t r = e.rank, N = g.n[p];
      for (int i = 0; i < tile.nrows; ++i) {
        const int32_t row = tile.rows[i];
        QUILT_ASSERT(row >= 0 && row < T, "lora_expand: row ", row, " outside y ", y.describe());
        const float* v = part + (static_cast<int64_t>(t) * kLoraTileRows + i) * (kLoraMaxGroup * kLoraMaxRank) +
                         p * kLoraMaxRank;
        float* yr = y.as<float>() + row * ld_y + g.col[p];
        for (int64_t o = 0; o < N; ++o) {
          const float* b = B + o * r;
          float acc = 0;
          for (int64_t k = 0; k < r; ++k) acc += b[k] * v[k];
          yr[o] += acc;
        }
      }
    }
  }
}

}  // namespace quilt::cpu
