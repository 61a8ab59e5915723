#pragma once
// Continuous batching for one replica, with LoRAX/TGI router semantics (issue 3, item 3).
//
// A pure policy object: values in, plans out. No clocks, threads, logging or I/O, so the
// coordinator's scheduling loop drives it and tests drive it with tables of scripted arrivals.
//
// KV policy: reservation up front, as LoRAX does. Admitting a request allocates
// ceil((prompt_tokens + max_new_tokens) / block_size) blocks at once, so a running request can
// never run out of KV and nothing is ever preempted or recomputed. The price is capacity held for
// tokens that may never be generated (a request that stops at EOS early); finish() gives it back
// at once. A request that could never be admitted even alone is refused by submit(), which is
// what makes the FIFO queue below free of deadlock: once nothing runs, its head always fits.
//
// One step (next_step) may mix new prompts (prefill) with decode rows of running requests,
// because the model runs both in one forward. The admission rule is TGI's router loop:
//  - nothing running: admit waiting requests FIFO while they fit every budget;
//  - otherwise every running request decodes, and waiting ones join only when at least
//    floor(running * waiting_served_ratio) of them fit, or when the running batch has generated
//    max_waiting_tokens tokens since the last admission (then any number >= 1 joins). Joining
//    costs every running request a slower step, so small joins are batched up, but not forever.
// Admission is strictly FIFO: a head that does not fit blocks later requests even if they would
// fit. Skipping ahead would let a stream of small requests starve a large one indefinitely.
//
// The plans of one replica must execute in order (step k+1 after step k), because blocks freed
// by finish()/cancel() between two plans may be handed to a new request in the next plan.
#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/scheduler/block_allocator.h"

namespace quilt {

// Every key has a default and a unit; names and meanings are LoRAX's launcher flags.
struct SchedulerConfig {
  // Tokens per KV block.
  int32_t block_size = 16;
  // KV capacity of the replica, in blocks of block_size tokens.
  int32_t num_blocks = 1024;
  // Prompt tokens prefilled in one step, summed over the requests admitted in it.
  int64_t max_batch_prefill_tokens = 4096;
  // Tokens (prompt + max_new) reserved by all running requests; 0 = num_blocks * block_size.
  int64_t max_batch_total_tokens = 0;
  // Requests in the running batch.
  int32_t max_running_requests = 256;
  // Ratio (waiting that fit / running) needed before waiting requests join a running batch.
  double waiting_served_ratio = 1.2;
  // Tokens (one per step) a running batch generates after an admission before waiting requests
  // join it whatever the ratio; the admitting step's own token counts as the first.
  int32_t max_waiting_tokens = 20;
};

struct Request {
  uint64_t id = 0;
  int32_t prompt_tokens = 0;
  int32_t max_new_tokens = 0;
  // Empty = the base model. Carried into the plan; the policy does not look at it yet.
  std::string adapter{};
};

enum class SubmitStatus {
  kQueued,
  kEmptyPrompt,              // prompt_tokens < 1
  kInvalidMaxNewTokens,      // max_new_tokens < 1
  kDuplicateId,              // the id is waiting or running already
  kOverPrefillBudget,        // prompt_tokens > max_batch_prefill_tokens
  kOverMaxBatchTotalTokens,  // prompt_tokens + max_new_tokens > max_batch_total_tokens
  kOverKvCapacity,           // needs more KV blocks than the replica has
};

// Everything but kQueued means the request can never run here: the HTTP layer answers 422.
struct [[nodiscard]] SubmitResult {
  SubmitStatus status = SubmitStatus::kQueued;
  std::string reason;  // empty when queued; otherwise names the limit and both numbers
  bool ok() const { return status == SubmitStatus::kQueued; }
};

struct PrefillEntry {
  uint64_t id = 0;
  int32_t prompt_tokens = 0;
  std::string adapter;
  std::vector<int32_t> blocks;  // the request's whole block table, reserved for prompt + max_new
};

struct StepPlan {
  std::vector<PrefillEntry> prefill;  // admitted this step, in FIFO order
  std::vector<uint64_t> decode;       // running ids that take a decode step, in admission order
  bool empty() const { return prefill.empty() && decode.empty(); }
  int64_t prefill_tokens() const;
};

class Scheduler {
 public:
  // Throws quilt::Error for a config that can never work (non-positive sizes, negative ratio).
  explicit Scheduler(SchedulerConfig config);

  // Queues the request, or refuses it at once with the limit it can never meet.
  SubmitResult submit(const Request& request);

  // Decides the next step: running requests decode, waiting ones may be admitted (their blocks
  // are allocated and they count as running from now on). A request admitted in step k decodes
  // from step k+1 on. A request that has been given all its max_new_tokens tokens (the prefill
  // plus max_new_tokens - 1 decodes) is left out of decode until finish() is called: its
  // reservation has no room for more, so running it again would write past its blocks.
  StepPlan next_step();

  // The request stopped (eos, stop sequence, length): its blocks are free for the next admission.
  // Returns false, changing nothing, when the id is not running (unknown, waiting, already gone).
  bool finish(uint64_t id);

  // The client went away: removes a waiting or running request and frees its blocks.
  // Returns false when the id is neither (a cancel racing a finish is not an error).
  bool cancel(uint64_t id);

  // Observers for metrics and tests.
  const SchedulerConfig& config() const { return config_; }  // with max_batch_total_tokens resolved
  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }
  int32_t free_blocks() const { return blocks_.num_free(); }
  int32_t used_blocks() const { return blocks_.num_used(); }
  // Sum of prompt + max_new over the running requests.
  int64_t reserved_tokens() const { return reserved_tokens_; }
  bool is_waiting(uint64_t id) const;
  bool is_running(uint64_t id) const;
  // Empty when the id is not running.
  std::span<const int32_t> block_table(uint64_t id) const;
  // Blocks a request of this many tokens reserves.
  int32_t blocks_for(int64_t tokens) const;

 private:
  struct Running {
    Request request;
    std::vector<int32_t> blocks;
    int32_t tokens_scheduled = 0;  // the prefill's token plus one per decode step
  };

  // How many requests at the head of the queue fit together in the free budgets now.
  size_t admissible_prefix() const;
  std::vector<Running>::iterator find_running(uint64_t id);
  void release(std::vector<Running>::iterator it);

  SchedulerConfig config_;
  BlockAllocator blocks_;
  std::deque<Request> waiting_;
  std::vector<Running> running_;             // in admission order, which is the decode order
  std::unordered_map<uint64_t, bool> live_;  // id -> running (false: waiting)
  int64_t reserved_tokens_ = 0;
  // TGI's `waiting_tokens`: tokens generated by the running batch since the last admission,
  // counting the admitting step's own token.
  int64_t tokens_since_admission_ = 0;
};

}  // namespace quilt
