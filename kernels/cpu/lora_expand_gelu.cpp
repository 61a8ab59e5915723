#include <cmath>

#include "kernels/cpu/ops.h"
#include "runtime/core/check.h"

namespace quilt::cpu {

// gelu_tanh_mul over every row, then the tile rows again with gate and up plus their LoRA terms
// (v from lora_shrink's partials, the loops of lora_expand): the same floats as lora_expand into
// gate_up followed by gelu_tanh_mul, without writing gate_up.
void lora_expand_gelu(const LoraStep& step, int layer, const LoraGroup& g, const Tensor& gate_up, Tensor& out) {
  lora_check_call(step, layer, g, gate_up, gate_up.dim(1), "lora_expand_gelu");
  const int64_t T = gate_up.dim(0), I = out.dim(1);
  QUILT_ASSERT(out.rank() == 2 && out.dim(0) == T && gate_up.dim(1) == 2 * I && g.count == 2 && g.col[0] == 0 &&
                   g.n[0] == I && g.col[1] == I && g.n[1] == I,
               "lora_expand_gelu: ", out.describe(), " of ", gate_up.describe(), " with modules at ", g.col[0], " and ",
               g.col[1]);
  gelu_tanh_mul(out, gate_up);
  const int32_t* words = step.tiles.as<int32_t>();
  const int ntiles = words[0];
  QUILT_ASSERT(ntiles >= 0 && ntiles <= step.max_tiles);
  const auto* tiles = reinterpret_cast<const LoraTile*>(words + kLoraHeaderInts);
  const auto* table = reinterpret_cast<const LoraEntry*>(step.table.data());
  const float* part = step.partials.as<float>();
  const float k = 0.7978845608028654f;  // sqrt(2/pi), as gelu_tanh_mul
  for (int t = 0; t < ntiles; ++t) {
    const LoraTile& tile = tiles[t];
    const LoraEntry* ent = table + (static_cast<int64_t>(tile.slot) * step.layers + layer) * step.modules;
    const LoraEntry& eg = ent[g.module[0]];
    const LoraEntry& eu = ent[g.module[1]];
    for (int i = 0; i < tile.nrows; ++i) {
      const int32_t row = tile.rows[i];
      QUILT_ASSERT(row >= 0 && row < T, "lora_expand_gelu: row ", row, " outside ", gate_up.describe());
      const float* v = part + (static_cast<int64_t>(t) * kLoraTileRows + i) * (kLoraMaxGroup * kLoraMaxRank);
      const float* gr = gate_up.as<float>() + row * 2 * I;
      float* o = out.as<float>() + row * I;
      for (int64_t c = 0; c < I; ++c) {
        float x = gr[c], u = gr[I + c];
        if (eg.rank > 0) {
          const float* b = static_cast<const float*>(eg.B) + c * eg.rank;
          float acc = 0;
          for (int j = 0; j < eg.rank; ++j) acc += b[j] * v[j];
          x += acc;
        }
        if (eu.rank > 0) {
          const float* b = static_cast<const float*>(eu.B) + c * eu.rank;
          float acc = 0;
          for (int j = 0; j < eu.rank; ++j) acc += b[j] * v[kLoraMaxRank + j];
          u += acc;
        }
        const float gelu = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
        o[c] = gelu * u;
      }
    }
  }
}

}  // namespace quilt::cpu
