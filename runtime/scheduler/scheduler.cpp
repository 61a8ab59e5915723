#include "runtime/scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
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
  waiting_.push_back(r);
  live_.emplace(r.id, false);
  return {};
}

size_t Scheduler::admissible_prefix() const {
  int64_t prefill_left = config_.max_batch_prefill_tokens;
  int64_t tokens_left = config_.max_batch_total_tokens - reserved_tokens_;
  int64_t slots_left = config_.max_running_requests - static_cast<int64_t>(running_.size());
  int64_t blocks_left = blocks_.num_free();
  size_t n = 0;
  for (const auto& r : waiting_) {
    const int64_t tokens = reservation(r);
    const int64_t blocks = blocks_for(tokens);
    if (slots_left < 1 || r.prompt_tokens > prefill_left || tokens > tokens_left ||
        blocks > blocks_left) {
      break;  // FIFO: never skip the head (see the header)
    }
    --slots_left;
    prefill_left -= r.prompt_tokens;
    tokens_left -= tokens;
    blocks_left -= blocks;
    ++n;
  }
  return n;
}

StepPlan Scheduler::next_step() {
  StepPlan plan;
  plan.decode.reserve(running_.size());
  for (auto& r : running_) {
    if (r.tokens_scheduled < r.request.max_new_tokens) {
      plan.decode.push_back(r.request.id);
      ++r.tokens_scheduled;
    }
  }

  size_t admit = admissible_prefix();
  if (!running_.empty() && admit > 0) {
    const bool forced = tokens_since_admission_ >= config_.max_waiting_tokens;
    const double min_join =
        forced ? 1.0
               : std::floor(static_cast<double>(running_.size()) * config_.waiting_served_ratio);
    if (static_cast<double>(admit) < min_join) admit = 0;
  }

  plan.prefill.reserve(admit);
  for (size_t i = 0; i < admit; ++i) {
    Request r = std::move(waiting_.front());
    waiting_.pop_front();
    auto blocks = blocks_.allocate(blocks_for(reservation(r)));
    QUILT_ASSERT(blocks.has_value(), "admissible_prefix admitted request ", r.id,
                 " without free blocks");
    reserved_tokens_ += reservation(r);
    live_[r.id] = true;
    plan.prefill.push_back({r.id, r.prompt_tokens, r.adapter, *blocks});
    running_.push_back({std::move(r), std::move(*blocks), 1});
  }
  QUILT_ASSERT(reserved_tokens_ <= config_.max_batch_total_tokens);
  QUILT_ASSERT(running_.size() <= static_cast<size_t>(config_.max_running_requests));

  if (admit > 0) {
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

void Scheduler::release(std::vector<Running>::iterator it) {
  blocks_.free(it->blocks);
  reserved_tokens_ -= reservation(it->request);
  live_.erase(it->request.id);
  running_.erase(it);
}

bool Scheduler::finish(uint64_t id) {
  const auto it = live_.find(id);
  if (it == live_.end() || !it->second) return false;
  const auto r = find_running(id);
  QUILT_ASSERT(r != running_.end(), "request ", id, " is marked running but not in the batch");
  release(r);
  return true;
}

bool Scheduler::cancel(uint64_t id) {
  const auto it = live_.find(id);
  if (it == live_.end()) return false;
  if (it->second) return finish(id);
  const auto w =
      std::find_if(waiting_.begin(), waiting_.end(), [id](const Request& r) { return r.id == id; });
  QUILT_ASSERT(w != waiting_.end(), "request ", id, " is marked waiting but not queued");
  waiting_.erase(w);
  live_.erase(it);
  return true;
}

bool Scheduler::is_waiting(uint64_t id) const {
  const auto it = live_.find(id);
  return it != live_.end() && !it->second;
}

bool Scheduler::is_running(uint64_t id) const {
  const auto it = live_.find(id);
  return it != live_.end() && it->second;
}

std::span<const int32_t> Scheduler::block_table(uint64_t id) const {
  if (!is_running(id)) return {};
  const auto r = std::find_if(running_.begin(), running_.end(),
                              [id](const Running& e) { return e.request.id == id; });
  return r->blocks;
}

}  // namespace quilt
