#include "runtime/scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
#include <queue>
#include <utility>

#include "runtime/core/check.h"

namespace quilt {
namespace {

SchedulerConfig resolved(SchedulerConfig c) {
  QUILT_REQUIRE(c.block_size > 0, "scheduler: block_size must be positive, got ", c.block_size);
  QUILT_REQUIRE(c.num_blocks > 0, "scheduler: num_blocks must be positive, got ", c.num_blocks);
  QUILT_REQUIRE(c.max_batch_prefill_tokens > 0,
                "scheduler: max_batch_prefill_tokens must be positive, got ",
                c.max_batch_prefill_tokens);
  QUILT_REQUIRE(c.max_batch_total_tokens >= 0,
                "scheduler: max_batch_total_tokens must be >= 0 (0 = KV capacity), got ",
                c.max_batch_total_tokens);
  QUILT_REQUIRE(c.max_running_requests > 0,
                "scheduler: max_running_requests must be positive, got ", c.max_running_requests);
  QUILT_REQUIRE(std::isfinite(c.waiting_served_ratio) && c.waiting_served_ratio >= 0,
                "scheduler: waiting_served_ratio must be a finite number >= 0, got ",
                c.waiting_served_ratio);
  QUILT_REQUIRE(c.max_waiting_tokens >= 0, "scheduler: max_waiting_tokens must be >= 0, got ",
                c.max_waiting_tokens);
  QUILT_REQUIRE(c.max_active_adapters > 0, "scheduler: max_active_adapters must be positive, got ",
                c.max_active_adapters);
  QUILT_REQUIRE(std::isfinite(c.adapter_cycle_time_s) && c.adapter_cycle_time_s >= 0,
                "scheduler: adapter_cycle_time_s must be a finite number of seconds >= 0, got ",
                c.adapter_cycle_time_s);
  if (c.max_batch_total_tokens == 0) {
    c.max_batch_total_tokens = static_cast<int64_t>(c.num_blocks) * c.block_size;
  }
  return c;
}

int64_t reservation(const Request& r) {
  return static_cast<int64_t>(r.prompt_tokens) + r.max_new_tokens;
}

}  // namespace

int64_t StepPlan::prefill_tokens() const {
  int64_t n = 0;
  for (const auto& p : prefill) n += p.prompt_tokens;
  return n;
}

Scheduler::Scheduler(SchedulerConfig config)
    : config_(resolved(config)), blocks_(config_.num_blocks) {}

int32_t Scheduler::blocks_for(int64_t tokens) const {
  return static_cast<int32_t>((tokens + config_.block_size - 1) / config_.block_size);
}

SubmitResult Scheduler::submit(const Request& r) {
  using detail::concat;
  if (r.prompt_tokens < 1) {
    return {SubmitStatus::kEmptyPrompt,
            concat("the prompt must have at least 1 token, got ", r.prompt_tokens)};
  }
  if (r.max_new_tokens < 1) {
    return {SubmitStatus::kInvalidMaxNewTokens,
            concat("max_new_tokens must be at least 1, got ", r.max_new_tokens)};
  }
  if (live_.contains(r.id)) {
    return {SubmitStatus::kDuplicateId,
            concat("request id ", r.id, " is already queued or running")};
  }
  if (r.prompt_tokens > config_.max_batch_prefill_tokens) {
    return {
        SubmitStatus::kOverPrefillBudget,
        concat("the prompt has ", r.prompt_tokens, " tokens, more than max_batch_prefill_tokens (",
               config_.max_batch_prefill_tokens, ")")};
  }
  const int64_t tokens = reservation(r);
  if (tokens > config_.max_batch_total_tokens) {
    return {SubmitStatus::kOverMaxBatchTotalTokens,
            concat("prompt_tokens + max_new_tokens = ", tokens,
                   " is more than max_batch_total_tokens (", config_.max_batch_total_tokens, ")")};
  }
  if (blocks_for(tokens) > config_.num_blocks) {
    return {
        SubmitStatus::kOverKvCapacity,
        concat("prompt_tokens + max_new_tokens = ", tokens, " needs ", blocks_for(tokens),
               " KV blocks of ", config_.block_size,
               " tokens, more than the replica's KV capacity (", config_.num_blocks, " blocks)")};
  }
  adapters_[r.adapter].waiting.push_back({r, next_seq_++});
  live_.emplace(r.id, Live{false, r.adapter});
  ++num_waiting_;
  return {};
}

uint64_t Scheduler::line_key(const Adapter& a) {
  const uint64_t head = a.waiting.front().seq;
  return a.running > 0 ? head : std::max(a.turn, head);
}

std::vector<Scheduler::AdapterMap::iterator> Scheduler::select_admissions() {
  const auto max_active = static_cast<size_t>(config_.max_active_adapters);
  // Cycling applies only while an adapter cannot get a slot because all are taken.
  bool slot_wanted = false;
  if (num_active_ >= max_active) {
    for (const auto& [name, a] : adapters_) {
      if (!name.empty() && a.running == 0 && !a.waiting.empty()) {
        slot_wanted = true;
        break;
      }
    }
  }

  struct Head {
    uint64_t key;
    AdapterMap::iterator adapter;
    size_t index;  // into adapter->waiting: the heads before it are taken in this step
    bool operator>(const Head& o) const { return key > o.key; }
  };
  std::priority_queue<Head, std::vector<Head>, std::greater<>> heads;
  for (auto it = adapters_.begin(); it != adapters_.end(); ++it) {
    const Adapter& a = it->second;
    if (a.waiting.empty() || !is_ready(it->first)) continue;
    if (a.running > 0 && !it->first.empty() && slot_wanted &&
        now_s_ - a.activated_s >= config_.adapter_cycle_time_s) {
      continue;  // gives way
    }
    heads.push({line_key(a), it, 0});
  }

  int64_t prefill_left = config_.max_batch_prefill_tokens;
  int64_t tokens_left = config_.max_batch_total_tokens - reserved_tokens_;
  int64_t slots_left = config_.max_running_requests - static_cast<int64_t>(running_.size());
  int64_t blocks_left = blocks_.num_free();
  size_t free_active = max_active > num_active_ ? max_active - num_active_ : 0;
  std::vector<AdapterMap::iterator> out;
  while (!heads.empty()) {
    const Head h = heads.top();
    heads.pop();
    const bool active = h.adapter->first.empty() || h.adapter->second.running > 0 || h.index > 0;
    if (!active && free_active == 0) continue;  // passed over, holds nothing up
    const Request& r = h.adapter->second.waiting[h.index].request;
    const int64_t tokens = reservation(r);
    const int64_t blocks = blocks_for(tokens);
    if (slots_left < 1 || r.prompt_tokens > prefill_left || tokens > tokens_left ||
        blocks > blocks_left) {
      break;  // head-of-line: never skip an eligible head that does not fit (see the header)
    }
    --slots_left;
    prefill_left -= r.prompt_tokens;
    tokens_left -= tokens;
    blocks_left -= blocks;
    if (!active) --free_active;
    out.push_back(h.adapter);
    const size_t next = h.index + 1;
    if (next < h.adapter->second.waiting.size()) {
      heads.push({h.adapter->second.waiting[next].seq, h.adapter, next});  // active now
    }
  }
  return out;
}

StepPlan Scheduler::next_step(double now_s) {
  QUILT_REQUIRE(std::isfinite(now_s) && now_s >= now_s_, "scheduler: next_step(now_s = ", now_s,
                ") went back in time from ", now_s_);
  now_s_ = now_s;
  StepPlan plan;
  plan.decode.reserve(running_.size());
  for (auto& r : running_) {
    if (r.tokens_scheduled < r.request.max_new_tokens) {
      plan.decode.push_back(r.request.id);
      ++r.tokens_scheduled;
    }
  }

  std::vector<AdapterMap::iterator> admit = select_admissions();
  if (!running_.empty() && !admit.empty()) {
    const bool forced = tokens_since_admission_ >= config_.max_waiting_tokens;
    const double min_join =
        forced ? 1.0
               : std::floor(static_cast<double>(running_.size()) * config_.waiting_served_ratio);
    if (static_cast<double>(admit.size()) < min_join) admit.clear();
  }

  plan.prefill.reserve(admit.size());
  for (const auto it : admit) {
    Adapter& a = it->second;
    Request r = std::move(a.waiting.front().request);
    a.waiting.pop_front();
    --num_waiting_;
    auto blocks = blocks_.allocate(blocks_for(reservation(r)));
    QUILT_ASSERT(blocks.has_value(), "select_admissions admitted request ", r.id,
                 " without free blocks");
    reserved_tokens_ += reservation(r);
    live_.at(r.id).running = true;
    if (a.running++ == 0) {
      a.activated_s = now_s_;
      a.activated_seq = next_seq_++;
      if (!it->first.empty()) ++num_active_;
    }
    plan.prefill.push_back({r.id, r.prompt_tokens, r.adapter, *blocks});
    running_.push_back({std::move(r), std::move(*blocks), 1});
  }
  QUILT_ASSERT(reserved_tokens_ <= config_.max_batch_total_tokens);
  QUILT_ASSERT(running_.size() <= static_cast<size_t>(config_.max_running_requests));
  QUILT_ASSERT(num_active_ <= static_cast<size_t>(config_.max_active_adapters));

  if (!admit.empty()) {
    tokens_since_admission_ = 1;
  } else if (!plan.decode.empty()) {
    ++tokens_since_admission_;
  }
  return plan;
}

std::vector<Scheduler::Running>::iterator Scheduler::find_running(uint64_t id) {
  return std::find_if(running_.begin(), running_.end(),
                      [id](const Running& r) { return r.request.id == id; });
}

void Scheduler::forget_if_idle(AdapterMap::iterator it) {
  if (it->second.running == 0 && it->second.waiting.empty()) adapters_.erase(it);
}

void Scheduler::release(std::vector<Running>::iterator it) {
  const auto a = adapters_.find(it->request.adapter);
  QUILT_ASSERT(a != adapters_.end() && a->second.running > 0, "running request ", it->request.id,
               " has no active adapter");
  if (--a->second.running == 0 && !a->first.empty()) {
    --num_active_;
    if (now_s_ - a->second.activated_s >= config_.adapter_cycle_time_s) {
      a->second.turn = next_seq_++;  // cycled out: the back of the line
    }
  }
  forget_if_idle(a);
  blocks_.free(it->blocks);
  reserved_tokens_ -= reservation(it->request);
  live_.erase(it->request.id);
  running_.erase(it);
}

bool Scheduler::finish(uint64_t id) {
  const auto it = live_.find(id);
  if (it == live_.end() || !it->second.running) return false;
  const auto r = find_running(id);
  QUILT_ASSERT(r != running_.end(), "request ", id, " is marked running but not in the batch");
  release(r);
  return true;
}

bool Scheduler::cancel(uint64_t id) {
  const auto it = live_.find(id);
  if (it == live_.end()) return false;
  if (it->second.running) return finish(id);
  const auto a = adapters_.find(it->second.adapter);
  QUILT_ASSERT(a != adapters_.end(), "request ", id, " is waiting on an unknown adapter");
  auto& q = a->second.waiting;
  const auto w =
      std::find_if(q.begin(), q.end(), [id](const Waiting& e) { return e.request.id == id; });
  QUILT_ASSERT(w != q.end(), "request ", id, " is marked waiting but not queued");
  q.erase(w);
  --num_waiting_;
  live_.erase(it);
  forget_if_idle(a);
  return true;
}

void Scheduler::set_ready(const std::string& adapter, bool ready) {
  if (adapter.empty()) {
    QUILT_REQUIRE(ready, "scheduler: the base model (adapter \"\") is always ready");
    return;
  }
  if (ready) {
    ready_.insert(adapter);
  } else {
    ready_.erase(adapter);
  }
}

bool Scheduler::is_ready(const std::string& adapter) const {
  return adapter.empty() || ready_.contains(adapter);
}

bool Scheduler::is_waiting(uint64_t id) const {
  const auto it = live_.find(id);
  return it != live_.end() && !it->second.running;
}

bool Scheduler::is_running(uint64_t id) const {
  const auto it = live_.find(id);
  return it != live_.end() && it->second.running;
}

std::span<const int32_t> Scheduler::block_table(uint64_t id) const {
  if (!is_running(id)) return {};
  const auto r = std::find_if(running_.begin(), running_.end(),
                              [id](const Running& e) { return e.request.id == id; });
  return r->blocks;
}

namespace {
std::vector<std::string> names_in_order(std::vector<std::pair<uint64_t, const std::string*>> v) {
  std::sort(v.begin(), v.end());
  std::vector<std::string> out;
  out.reserve(v.size());
  for (const auto& e : v) out.push_back(*e.second);
  return out;
}
}  // namespace

std::vector<std::string> Scheduler::wanted_adapters() const {
  std::vector<std::pair<uint64_t, const std::string*>> wanted;
  for (const auto& [name, a] : adapters_) {
    if (!a.waiting.empty() && !is_ready(name)) wanted.emplace_back(line_key(a), &name);
  }
  return names_in_order(std::move(wanted));
}

std::vector<std::string> Scheduler::pending_adapters() const {
  std::vector<std::pair<uint64_t, const std::string*>> pending;
  for (const auto& [name, a] : adapters_) {
    if (!name.empty() && !a.waiting.empty() && a.running == 0) {
      pending.emplace_back(line_key(a), &name);
    }
  }
  return names_in_order(std::move(pending));
}

std::vector<std::string> Scheduler::active_adapters() const {
  std::vector<std::pair<uint64_t, const std::string*>> active;
  for (const auto& [name, a] : adapters_) {
    if (a.running > 0 && !name.empty()) active.emplace_back(a.activated_seq, &name);
  }
  return names_in_order(std::move(active));
}

size_t Scheduler::running_for(const std::string& adapter) const {
  const auto it = adapters_.find(adapter);
  return it == adapters_.end() ? 0 : it->second.running;
}

size_t Scheduler::waiting_for(const std::string& adapter) const {
  const auto it = adapters_.find(adapter);
  return it == adapters_.end() ? 0 : it->second.waiting.size();
}

std::vector<uint64_t> Scheduler::waiting_ids(const std::string& adapter) const {
  std::vector<uint64_t> ids;
  const auto it = adapters_.find(adapter);
  if (it == adapters_.end()) return ids;
  ids.reserve(it->second.waiting.size());
  for (const auto& w : it->second.waiting) ids.push_back(w.request.id);
  return ids;
}

bool Scheduler::idle(const std::string& adapter) const { return !adapters_.contains(adapter); }

}  // namespace quilt
