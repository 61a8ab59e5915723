#pragma once
// Multi-LoRA for a whole step (S-LoRA / Punica style): the plan that Backend::lora_shrink and
// Backend::lora_expand read from backend memory, so that the step's LoRA calls (4 groups per
// layer) do no host work and no upload, and their launches do not depend on the adapter mix (a
// decode step with adapters is recorded in a graph like a base one).
//
//  - The table (LoraTable): per slot, layer and module, the factors' addresses and rank
//    (LoraEntry). An adapter takes a slot when it first appears and keeps it while it is used; its
//    entries are uploaded again only when they change (the AdapterStore's slots reserve their
//    memory at start, so their addresses never do).
//  - The tiles (lora_tiles): the step's rows grouped by slot, up to kLoraTileRows rows of one slot
//    per tile, behind a header (tile count, base row count), then the rows in no tile (the base
//    model's, for lora_expand_gelu, which writes every row). Built on the host and uploaded once
//    per step; every layer and module reads the same tiles.
//  - The partials: fp32 scratch between a group's shrink (v = x A^T) and its expand (y += v B^T),
//    in a backend-private layout of at most lora_partial_floats(max_tiles) floats, zeroed when
//    made (the CUDA shrink keeps counters there, and leaves them at zero).
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "quilt/kernels/tensor.h"

#if defined(__CUDACC__)
#define QUILT_LORA_HD __host__ __device__
#else
#define QUILT_LORA_HD
#endif

namespace quilt {

class Backend;

constexpr int kLoraTileRows = 8;     // rows per tile (the shrink reads A once per tile)
constexpr int kLoraMaxRank = 128;    // largest rank the kernels take
constexpr int kLoraMaxGroup = 3;     // modules per call (q, k, v)
constexpr int kLoraHeaderInts = 4;   // tiles: [0] tile count, [1] base row count, the rest 0
constexpr int kLoraTargetItems = 256;  // the CUDA shrink splits K until tiles x splits reaches this

// One module of one adapter in the table (the same bytes on the host and on the device).
struct LoraEntry {
  const void* A;  // [rank, k] in the backend's dtype
  const void* B;  // [n, rank], the scale folded in
  int32_t rank;   // 0: the adapter does not touch this module
  int32_t pad;    // 0
};
static_assert(sizeof(LoraEntry) == 24, "LoraEntry layout");
constexpr int kLoraEntryInts = static_cast<int>(sizeof(LoraEntry) / sizeof(int32_t));

// Up to kLoraTileRows rows of x and y that use one slot.
struct LoraTile {
  int32_t slot, nrows;
  int32_t rows[kLoraTileRows];
};
static_assert(sizeof(LoraTile) == 40, "LoraTile layout");
constexpr int kLoraTileInts = static_cast<int>(sizeof(LoraTile) / sizeof(int32_t));

// Modules that read the same x into column ranges of one y in one call: q/k/v into the fused qkv,
// gate/up into gate_up, o, down. Column ranges must not overlap.
struct LoraGroup {
  int count = 0;
  int module[kLoraMaxGroup] = {};   // the table's module index (LoraTarget)
  int64_t col[kLoraMaxGroup] = {};  // first column of y
  int64_t n[kLoraMaxGroup] = {};    // output width (B's rows)
  int64_t k = 0;                    // input width: x's columns, A's columns
  void add(int mod, int64_t column, int64_t width) {
    module[count] = mod;
    col[count] = column;
    n[count] = width;
    ++count;
  }
};

// A step's plan on the backend (tensors owned by the caller).
struct LoraStep {
  Tensor table;     // i32 [slots, layers * modules * kLoraEntryInts] (LoraTable::tensor())
  Tensor tiles;     // i32: lora_tiles' words (capacity kLoraHeaderInts + max_tiles * kLoraTileInts + max_rows)
  Tensor partials;  // f32 [>= lora_partial_floats(max_tiles)], zeroed when made (Backend::zeros)
  int layers = 0, modules = 0;
  // Tiles and rows the buffers hold; the launches are sized by them, not by the counts.
  int max_tiles = 0, max_rows = 0;
};

// How the CUDA shrink splits K: `splits` chunks of `chunk` columns, a multiple of `granule` (the
// columns a warp reads with one 16-byte load per lane), so that tiles x splits reaches about
// kLoraTargetItems. The expand recomputes it from the same tile count. splits x ntiles is below
// kLoraTargetItems + ntiles.
struct LoraSplit {
  int splits;
  int64_t chunk;
};
QUILT_LORA_HD inline LoraSplit lora_split(int64_t K, int ntiles, int granule) {
  if (K <= 0 || ntiles <= 0) return {1, K > 0 ? K : 1};
  const int64_t max_splits = (K + granule - 1) / granule;
  int64_t s = (kLoraTargetItems + ntiles - 1) / ntiles;
  if (s > max_splits) s = max_splits;
  if (s < 1) s = 1;
  const int64_t chunk = ((K + s - 1) / s + granule - 1) / granule * granule;
  return {static_cast<int>((K + chunk - 1) / chunk), chunk};
}
// Floats of partials for up to max_tiles tiles on any backend: v per (tile, row) and per (split,
// tile, row), kLoraMaxGroup x kLoraMaxRank values each, and a counter per tile.
inline int64_t lora_partial_floats(int64_t max_tiles) {
  return (kLoraTargetItems + 2 * max_tiles) * kLoraTileRows * kLoraMaxGroup * kLoraMaxRank + max_tiles;
}

// The i32 words of a step's tiles for T rows: row t uses slot row_slot[t] (< 0: no adapter).
// A slot's rows go in increasing order, kLoraTileRows per tile, slots in order of their first
// row. words[0] is the tile count (at most T), words[1] the count of rows in no tile, listed in
// increasing order after the tiles: kLoraHeaderInts + tiles * kLoraTileInts + base rows <= the
// capacity of T tiles and T rows.
std::vector<int32_t> lora_tiles(const std::vector<int32_t>& row_slot);

// Checks the shapes of a shrink / expand call against its plan (our bugs: QUILT_ASSERT).
void lora_check_call(const LoraStep& step, int layer, const LoraGroup& group, const Tensor& xy, int64_t xy_width,
                     const char* op);

// The table of one backend: slots of layers x modules entries, in an i32 tensor that grows (and
// is then reallocated: epoch() changes, and graphs that read it must be recorded again).
class LoraTable {
 public:
  LoraTable(Backend& be, int layers, int modules, int initial_slots = 8);
  // A new step: slots used by earlier steps may be given to other adapters.
  void begin_step();
  // The slot of adapter `key` with these entries ([layers * modules], layer-major), uploaded when
  // the slot does not already hold them. A slot used in this step is not given to another key.
  int slot(const void* key, const std::vector<LoraEntry>& entries);
  // Whether key's slot already holds exactly these entries (slot() would upload nothing).
  bool holds(const void* key, const std::vector<LoraEntry>& entries) const;
  const Tensor& tensor() const { return table_; }
  uint64_t epoch() const { return epoch_; }
  int layers() const { return layers_; }
  int modules() const { return modules_; }
  int capacity() const { return static_cast<int>(slots_.size()); }
  // Entries uploaded so far (tests: a known adapter with unchanged entries costs none).
  uint64_t uploads() const { return uploads_; }

 private:
  struct Slot {
    const void* key = nullptr;
    std::vector<LoraEntry> entries;
    uint64_t last_step = 0;
  };
  void upload(int slot);
  void grow();

  Backend& be_;
  int layers_, modules_;
  Tensor table_;
  std::vector<Slot> slots_;
  std::unordered_map<const void*, int> by_key_;
  uint64_t step_ = 1, epoch_ = 0, uploads_ = 0;
};

}  // namespace quilt
