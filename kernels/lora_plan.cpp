#include "quilt/kernels/lora_plan.h"

#include <algorithm>
#include <cstring>

#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

namespace quilt {

std::vector<int32_t> lora_tiles(const std::vector<int32_t>& row_slot) {
  // Rows of each slot, slots in order of their first row.
  std::vector<int32_t> order;  // slots by first row
  std::unordered_map<int32_t, std::vector<int32_t>> rows;
  std::vector<int32_t> base;
  for (size_t t = 0; t < row_slot.size(); ++t) {
    const int32_t s = row_slot[t];
    if (s < 0) {
      base.push_back(static_cast<int32_t>(t));
      continue;
    }
    auto& r = rows[s];
    if (r.empty()) order.push_back(s);
    r.push_back(static_cast<int32_t>(t));
  }
  std::vector<int32_t> words(kLoraHeaderInts, 0);
  int32_t ntiles = 0;
  for (int32_t s : order) {
    const auto& r = rows[s];
    for (size_t b = 0; b < r.size(); b += kLoraTileRows) {
      LoraTile tile{};
      tile.slot = s;
      tile.nrows = static_cast<int32_t>(std::min<size_t>(kLoraTileRows, r.size() - b));
      for (int i = 0; i < tile.nrows; ++i) tile.rows[i] = r[b + i];
      const auto* w = reinterpret_cast<const int32_t*>(&tile);
      words.insert(words.end(), w, w + kLoraTileInts);
      ++ntiles;
    }
  }
  words[0] = ntiles;
  words[1] = static_cast<int32_t>(base.size());
  words.insert(words.end(), base.begin(), base.end());
  return words;
}

void lora_check_call(const LoraStep& s, int layer, const LoraGroup& g, const Tensor& xy, int64_t xy_width,
                     const char* op) {
  QUILT_ASSERT(s.layers > 0 && s.modules > 0 && layer >= 0 && layer < s.layers, op, ": layer ", layer, " of ",
               s.layers);
  QUILT_ASSERT(s.table.dtype() == DType::i32 && s.table.rank() == 2 &&
                   s.table.dim(1) == static_cast<int64_t>(s.layers) * s.modules * kLoraEntryInts,
               op, ": table ", s.table.describe(), " for ", s.layers, " layers x ", s.modules, " modules");
  // (The base rows after the tiles are at most max_rows, fewer by the rows in tiles: their count
  // is on the device only; lora_tiles' words fit a capacity of max_tiles tiles and max_rows rows.)
  QUILT_ASSERT(s.max_tiles >= 0 && s.max_rows >= 0 && s.tiles.dtype() == DType::i32 &&
                   s.tiles.numel() >= kLoraHeaderInts + static_cast<int64_t>(s.max_tiles) * kLoraTileInts,
               op, ": tiles ", s.tiles.describe(), " for ", s.max_tiles, " tiles");
  QUILT_ASSERT(s.partials.dtype() == DType::f32 && s.partials.numel() >= lora_partial_floats(s.max_tiles), op,
               ": partials ", s.partials.describe(), " for ", s.max_tiles, " tiles");
  QUILT_ASSERT(g.count >= 1 && g.count <= kLoraMaxGroup && g.k > 0, op, ": group of ", g.count, " modules, k ", g.k);
  QUILT_ASSERT(xy.rank() == 2 && xy.dim(1) == xy_width, op, ": ", xy.describe(), " is not ", xy_width, " wide");
  for (int p = 0; p < g.count; ++p) {
    QUILT_ASSERT(g.module[p] >= 0 && g.module[p] < s.modules, op, ": module ", g.module[p]);
    QUILT_ASSERT(g.n[p] > 0 && g.col[p] >= 0, op, ": module ", p, " at column ", g.col[p], " width ", g.n[p]);
    for (int q = 0; q < p; ++q)
      QUILT_ASSERT(g.col[p] + g.n[p] <= g.col[q] || g.col[q] + g.n[q] <= g.col[p], op, ": modules ", q, " and ", p,
                   " write overlapping columns");
  }
}

LoraTable::LoraTable(Backend& be, int layers, int modules, int initial_slots)
    : be_(be), layers_(layers), modules_(modules) {
  QUILT_ASSERT(layers > 0 && modules > 0 && initial_slots > 0);
  slots_.resize(initial_slots);
  table_ = be_.zeros({initial_slots, static_cast<int64_t>(layers_) * modules_ * kLoraEntryInts}, DType::i32);
}

void LoraTable::begin_step() { ++step_; }

int LoraTable::slot(const void* key, const std::vector<LoraEntry>& entries) {
  QUILT_ASSERT(key != nullptr && entries.size() == static_cast<size_t>(layers_) * modules_, "LoraTable: ",
               entries.size(), " entries for ", layers_, " x ", modules_);
  int i;
  if (auto it = by_key_.find(key); it != by_key_.end()) {
    i = it->second;
  } else {
    // A free slot, else the one unused for longest (not by this step), else a bigger table.
    i = -1;
    for (int k = 0; k < capacity(); ++k) {
      if (!slots_[k].key) {
        i = k;
        break;
      }
      if (slots_[k].last_step < step_ && (i < 0 || slots_[k].last_step < slots_[i].last_step)) i = k;
    }
    if (i < 0) {
      i = capacity();
      grow();
    }
    if (slots_[i].key) by_key_.erase(slots_[i].key);
    slots_[i].key = key;
    slots_[i].entries.clear();  // uploaded below
    by_key_[key] = i;
  }
  Slot& s = slots_[i];
  s.last_step = step_;
  if (s.entries.size() != entries.size() ||
      std::memcmp(s.entries.data(), entries.data(), entries.size() * sizeof(LoraEntry)) != 0) {
    s.entries = entries;
    upload(i);
  }
  return i;
}

bool LoraTable::holds(const void* key, const std::vector<LoraEntry>& entries) const {
  const auto it = by_key_.find(key);
  if (it == by_key_.end()) return false;
  const Slot& s = slots_[it->second];
  return s.entries.size() == entries.size() &&
         std::memcmp(s.entries.data(), entries.data(), entries.size() * sizeof(LoraEntry)) == 0;
}

void LoraTable::upload(int i) {
  Tensor row = table_.slice_rows(i, i + 1);
  be_.upload_i32(row, reinterpret_cast<const int32_t*>(slots_[i].entries.data()));
  uploads_ += slots_[i].entries.size();
}

void LoraTable::grow() {
  // Stream order keeps this safe: steps enqueued before read the old tensor, which lives until they ran.
  const int old = capacity();
  slots_.resize(static_cast<size_t>(old) * 2);
  table_ = be_.zeros({capacity(), static_cast<int64_t>(layers_) * modules_ * kLoraEntryInts}, DType::i32);
  ++epoch_;
  for (int k = 0; k < old; ++k)
    if (slots_[k].key) upload(k);
}

}  // namespace quilt
