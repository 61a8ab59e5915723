#pragma once
// A worker rank's LoRA adapters: a fixed number of slots whose backend memory is reserved at
// start (every module of every layer at the configured max rank), and a host-RAM cache of
// adapters already read from disk, so that reloading an evicted adapter touches no disk.
// Ranks below the max rank are zero-padded: the padded factors give the same product.
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/gemma_model.h"
#include "model/lora_adapter.h"

namespace quilt {

struct AdapterStoreOptions {
  int num_slots = 8;                     // adapters resident at once on this rank
  int max_rank = 64;                     // the largest LoRA rank a slot can hold
  size_t host_cache_bytes = size_t{1} << 30;  // host RAM for adapters read from disk (LRU)
};

class AdapterStore {
 public:
  AdapterStore(GemmaForCausalLM& model, Backend& backend, AdapterStoreOptions opt);

  // Reads and validates an adapter, or takes it from the host cache. Thread-safe: loads run on
  // a loader thread while steps go on. Throws quilt::Error naming the problem.
  std::shared_ptr<const HostLoraAdapter> read(const std::string& name, const std::string& path);
  // Copies an adapter into a slot's reserved memory (on the thread that runs steps).
  void install(int slot, const HostLoraAdapter& adapter);
  void evict(int slot);
  // The slot's adapter, or null when the slot is empty.
  const LoraAdapterShard* slot(int s) const;
  const std::string& slot_name(int s) const;
  int num_slots() const { return static_cast<int>(slots_.size()); }
  size_t host_cache_bytes() const;
  size_t reserved_bytes() const { return reserved_bytes_; }
  bool cached(const std::string& path) const;

 private:
  struct Slot {
    LoraAdapterShard buffers;  // every module at max_rank: the reserved memory
    LoraAdapterShard view;     // the installed adapter's modules (views of buffers)
    std::string name;
    bool used = false;
  };
  GemmaForCausalLM& model_;
  Backend& be_;
  AdapterStoreOptions opt_;
  std::vector<Slot> slots_;
  size_t reserved_bytes_ = 0;
  mutable std::mutex cache_mu_;
  std::list<std::pair<std::string, std::shared_ptr<const HostLoraAdapter>>> lru_;  // front = newest
  size_t cache_bytes_ = 0;
};

}  // namespace quilt
