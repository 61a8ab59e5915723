#include "runtime/scheduler/block_allocator.h"

#include "runtime/core/check.h"

namespace quilt {

BlockAllocator::BlockAllocator(int32_t num_blocks) {
  QUILT_REQUIRE(num_blocks > 0, "BlockAllocator: num_blocks must be positive, got ", num_blocks);
  in_use_.assign(static_cast<size_t>(num_blocks), false);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Reversed so that a fresh allocator hands out 0, 1, 2, ...
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

std::optional<std::vector<int32_t>> BlockAllocator::allocate(int32_t n) {
  QUILT_REQUIRE(n >= 0, "BlockAllocator: cannot allocate ", n, " blocks");
  if (n > num_free()) return std::nullopt;
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& b : out) {
    b = free_.back();
    free_.pop_back();
    in_use_[static_cast<size_t>(b)] = true;
  }
  return out;
}

void BlockAllocator::free(std::span<const int32_t> blocks) {
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int32_t b = blocks[i];
    const bool in_range = b >= 0 && b < capacity();
    if (!in_range || !in_use_[static_cast<size_t>(b)]) {
      for (size_t j = 0; j < i; ++j) in_use_[static_cast<size_t>(blocks[j])] = true;  // undo
      if (!in_range)
        QUILT_FAIL("BlockAllocator: block ", b, " is out of range [0, ", capacity(), ")");
      QUILT_FAIL("BlockAllocator: block ", b, " is not in use (double free?)");
    }
    in_use_[static_cast<size_t>(b)] = false;
  }
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) free_.push_back(*it);
}

bool BlockAllocator::is_used(int32_t block) const {
  return block >= 0 && block < capacity() && in_use_[static_cast<size_t>(block)];
}

}  // namespace quilt
