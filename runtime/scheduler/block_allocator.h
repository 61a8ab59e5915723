#pragma once
// Paged KV block allocator of one replica. The coordinator owns it (DESIGN.md: the coordinator
// plans, workers execute), so block ids travel to the workers inside the step plan.
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace quilt {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  // All n blocks or none: a failed admission must leave nothing half-allocated behind.
  // Returns std::nullopt when fewer than n blocks are free; n == 0 gives an empty table.
  std::optional<std::vector<int32_t>> allocate(int32_t n);

  // Returns blocks to the free list; a block out of range or not in use is the caller's mistake
  // (QUILT_REQUIRE) and leaves the allocator unchanged. The most recently freed blocks are handed
  // out first, in the order they had in `blocks`, which keeps reuse deterministic and testable.
  void free(std::span<const int32_t> blocks);

  int32_t capacity() const { return static_cast<int32_t>(in_use_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return capacity() - num_free(); }
  bool is_used(int32_t block) const;

 private:
  std::vector<int32_t> free_;  // a stack: back() is handed out next
  std::vector<bool> in_use_;   // guards against double free
};

}  // namespace quilt
