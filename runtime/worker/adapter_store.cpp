#include "runtime/worker/adapter_store.h"

#include "runtime/core/check.h"

namespace quilt {

AdapterStore::AdapterStore(GemmaForCausalLM& model, Backend& backend, AdapterStoreOptions opt)
    : model_(model), be_(backend), opt_(opt) {
  QUILT_REQUIRE(opt.num_slots >= 0, "adapters.slots must be >= 0");
  QUILT_REQUIRE(opt.max_rank >= 1, "adapters.max_rank must be >= 1");
  const GemmaConfig& c = model.config();
  slots_.resize(opt.num_slots);
  for (auto& s : slots_) {
    s.buffers.layers.resize(c.num_hidden_layers);
    s.view.layers.resize(c.num_hidden_layers);
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const auto [in, out] = lora_local_dims(static_cast<LoraTarget>(t), c, model.tp());
        LoraModuleShard m;
        m.rank = opt.max_rank;
        m.A = be_.zeros({opt.max_rank, in}, be_.compute_dtype());
        m.B = be_.zeros({out, opt.max_rank}, be_.compute_dtype());
        reserved_bytes_ += m.A.bytes() + m.B.bytes();
        s.buffers.layers[l][t] = std::move(m);
      }
  }
}

std::shared_ptr<const HostLoraAdapter> AdapterStore::read(const std::string& name, const std::string& path) {
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it)
      if (it->first == path) {
        lru_.splice(lru_.begin(), lru_, it);
        return it->second;
      }
  }
  auto a = std::make_shared<const HostLoraAdapter>(HostLoraAdapter::load(path, name, model_.config()));
  QUILT_REQUIRE(a->max_rank <= opt_.max_rank, "adapter '", name, "' has rank ", a->max_rank,
                ", above the slots' adapters.max_rank (", opt_.max_rank, ")");
  std::lock_guard<std::mutex> lk(cache_mu_);
  lru_.emplace_front(path, a);
  cache_bytes_ += a->host_bytes();
  while (cache_bytes_ > opt_.host_cache_bytes && lru_.size() > 1) {
    cache_bytes_ -= lru_.back().second->host_bytes();
    lru_.pop_back();
  }
  return a;
}

bool AdapterStore::cached(const std::string& path) const {
  std::lock_guard<std::mutex> lk(cache_mu_);
  for (const auto& [p, _] : lru_)
    if (p == path) return true;
  return false;
}

size_t AdapterStore::host_cache_bytes() const {
  std::lock_guard<std::mutex> lk(cache_mu_);
  return cache_bytes_;
}

void AdapterStore::install(int slot, const HostLoraAdapter& a) {
  QUILT_REQUIRE(slot >= 0 && slot < num_slots(), "adapter slot ", slot, " outside [0, ", num_slots(), ")");
  QUILT_REQUIRE(a.max_rank <= opt_.max_rank, "adapter '", a.name, "' has rank ", a.max_rank,
                ", above adapters.max_rank (", opt_.max_rank, ")");
  const GemmaConfig& c = model_.config();
  Slot& s = slots_[slot];
  const int R = opt_.max_rank;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      auto& view = s.view.layers[l][t];
      const auto& mod = a.layers[l][t];
      if (!mod) {
        view.reset();
        continue;
      }
      const HostModuleShard h = shard_lora_module(*mod, static_cast<LoraTarget>(t), c, model_.tp());
      // Zero-pad to the slot's rank: rows of A past r and columns of B past r stay zero.
      std::vector<float> A(static_cast<size_t>(R * h.in), 0.0f), B(static_cast<size_t>(h.out * R), 0.0f);
      std::copy(h.A.begin(), h.A.end(), A.begin());
      for (int64_t o = 0; o < h.out; ++o) std::copy_n(h.B.data() + o * h.rank, h.rank, B.data() + o * R);
      LoraModuleShard& buf = *s.buffers.layers[l][t];
      Tensor ta = be_.from_host(A.data(), DType::f32, {R, h.in});
      Tensor tb = be_.from_host(B.data(), DType::f32, {h.out, R});
      be_.copy(buf.A, ta);
      be_.copy(buf.B, tb);
      view = buf;
    }
  s.view.name = a.name;
  s.name = a.name;
  s.used = true;
}

void AdapterStore::evict(int slot) {
  QUILT_REQUIRE(slot >= 0 && slot < num_slots(), "adapter slot ", slot, " outside [0, ", num_slots(), ")");
  Slot& s = slots_[slot];
  for (auto& l : s.view.layers)
    for (auto& m : l) m.reset();
  s.name.clear();
  s.used = false;
}

const LoraAdapterShard* AdapterStore::slot(int s) const {
  if (s < 0 || s >= num_slots() || !slots_[s].used) return nullptr;
  return &slots_[s].view;
}

const std::string& AdapterStore::slot_name(int s) const { return slots_.at(s).name; }

}  // namespace quilt
