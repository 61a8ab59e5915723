#pragma once
// Continuous batching for one replica, with LoRAX/TGI router semantics (issue 3, item 3) and
// LoRAX's fairness across LoRA adapters (issue 4, item 6).
//
// A pure policy object: values in, plans out. No clocks, threads, logging or I/O: the coordinator's
// scheduling loop passes the time in (next_step(now_s)) and tests drive it with tables of scripted
// arrivals.
//
// KV policy: reservation up front, as LoRAX does. Admitting a request allocates
// ceil((prompt_tokens + max_new_tokens) / block_size) blocks at once, so a running request can
// never run out of KV and nothing is ever preempted or recomputed. The price is capacity held for
// tokens that may never be generated (a request that stops at EOS early); finish() gives it back
// at once. A request that could never be admitted even alone is refused by submit(), which is
// what keeps admission free of deadlock: once nothing runs, the first ready head always fits.
//
// One step (next_step) may mix new prompts (prefill) with decode rows of running requests,
// because the model runs both in one forward. The admission rule is TGI's router loop:
//  - nothing running: admit waiting requests while they fit every budget;
//  - otherwise every running request decodes, and waiting ones join only when at least
//    floor(running * waiting_served_ratio) of them fit, or when the running batch has generated
//    max_waiting_tokens tokens since the last admission (then any number >= 1 joins). Joining
//    costs every running request a slower step, so small joins are batched up, but not forever.
//
// Adapters. Each LoRA adapter has its own FIFO queue, and so does the base model (adapter ""); a
// request is only ever admitted from the head of its adapter's queue.
//  - Ready: only an adapter the coordinator has marked ready on this replica (set_ready; the base
//    is always ready) is admitted. Requests of other adapters stay queued; wanted_adapters() tells
//    the coordinator which to load. Marking an adapter not ready stops new admissions only: its
//    running requests go on, and the coordinator must not evict it while running_for() > 0.
//  - Active: a LoRA adapter with requests in the running batch holds one of max_active_adapters
//    slots, from the admission of its first request until its last running request finishes or
//    is cancelled. Unlike LoRAX, the base model takes no slot: it has no weights to keep resident
//    and costs the batch no LoRA segment. Counting it would also open a hole: with every adapter
//    slot held by busy adapters and no base traffic, the set would never look full, nothing would
//    cycle, and an adapter waiting to be loaded could wait forever. For the same reason the
//    coordinator should set max_active_adapters <= its adapter slots per replica.
//  - Cycling: when every slot is taken and another adapter with waiting requests has none (ready,
//    or not ready yet: it can only be loaded into a slot that an active adapter leaves), each
//    active adapter that has been active for adapter_cycle_time_s or longer stops admitting. Its
//    running requests finish normally, which frees its slot. An adapter that was active that long
//    when it stopped being active goes to the back of the line (LoRAX's move from active to the
//    back of pending). The base model never gives way: it holds no slot.
//
// Order of admission within a step: repeatedly take the eligible queue head with the smallest
// key, where the key of an active adapter (or of the base model) is its head's arrival order, and
// the key of an adapter without a slot is its head's arrival order, or the moment it was cycled
// out if that is later. With one adapter this is exactly FIFO. Eligible means: ready, not giving
// way, and either active (or the base) or a slot is free. An adapter that is not eligible is
// passed over and holds nothing up. A head that is eligible but does not fit the budgets stops
// admission for the step (head-of-line blocking across all adapters): skipping ahead would let a
// stream of small requests starve a large one indefinitely. pending_adapters() and
// wanted_adapters() list adapters in this same key order, so loads follow the line as well.
//
// Starvation freedom: an adapter that waits for a slot gets one within about
// ceil(adapters ahead of it / max_active_adapters) slot turnovers, and a slot turns over within
// adapter_cycle_time_s plus the longest running request (max_new_tokens steps) plus
// max_waiting_tokens steps (see the starvation test for the bound it asserts). At the residency
// level this needs the coordinator to evict, when a wanted adapter finds no free slot, an adapter
// without running requests: an idle one (least recently used) first, else the one that comes last
// in pending_adapters() if it comes after the wanted one.
//
// The plans of one replica must execute in order (step k+1 after step k), because blocks freed
// by finish()/cancel() between two plans may be handed to a new request in the next plan.
#include <cstdint>
#include <deque>
#include <map>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
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
  // LoRA adapters with requests in the running batch at once (the base model "" takes no slot).
  int32_t max_active_adapters = 128;
  // Seconds an adapter may stay active and keep admitting while another ready adapter waits for
  // an active slot; 0 = give way at every chance.
  double adapter_cycle_time_s = 2.0;
};

struct Request {
  uint64_t id = 0;
  int32_t prompt_tokens = 0;
  int32_t max_new_tokens = 0;
  // Empty = the base model.
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
  std::vector<PrefillEntry> prefill;  // admitted this step, in admission order (see the header)
  std::vector<uint64_t> decode;       // running ids that take a decode step, in admission order
  bool empty() const { return prefill.empty() && decode.empty(); }
  int64_t prefill_tokens() const;
};

class Scheduler {
 public:
  // Throws quilt::Error for a config that can never work (non-positive sizes, negative ratio).
  explicit Scheduler(SchedulerConfig config);

  // Queues the request on its adapter's queue, or refuses it at once with the limit it can never
  // meet. Any adapter may be named; whether it is ready only matters for admission.
  SubmitResult submit(const Request& request);

  // Decides the next step at time now_s (seconds on any monotonic clock; it must not go back):
  // running requests decode, waiting ones may be admitted (their blocks are allocated and they
  // count as running from now on). A request admitted in step k decodes from step k+1 on. A
  // request that has been given all its max_new_tokens tokens (the prefill plus
  // max_new_tokens - 1 decodes) is left out of decode until finish() is called: its reservation
  // has no room for more, so running it again would write past its blocks.
  StepPlan next_step(double now_s);
  // The same at the time of the previous call (0 before any): time stands still, so no adapter
  // ever reaches adapter_cycle_time_s. Fine with one adapter; with several, pass the time.
  StepPlan next_step() { return next_step(now_s_); }

  // The request stopped (eos, stop sequence, length): its blocks are free for the next admission.
  // Returns false, changing nothing, when the id is not running (unknown, waiting, already gone).
  bool finish(uint64_t id);

  // The client went away: removes a waiting or running request and frees its blocks.
  // Returns false when the id is neither (a cancel racing a finish is not an error).
  bool cancel(uint64_t id);

  // Whether requests of `adapter` may be admitted on this replica (its weights are resident).
  // The base model "" is always ready; marking it not ready is the caller's mistake.
  void set_ready(const std::string& adapter, bool ready);
  bool is_ready(const std::string& adapter) const;

  // Observers for metrics and tests.
  const SchedulerConfig& config() const { return config_; }  // with max_batch_total_tokens resolved
  size_t num_waiting() const { return num_waiting_; }
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

  // Adapter observers, for the coordinator's residency decisions.
  // Adapters with waiting requests that are not ready, in line order (their oldest waiting
  // request's arrival, or the moment they were cycled out if later): what the coordinator should
  // load on this replica, first things first.
  std::vector<std::string> wanted_adapters() const;
  // LoRA adapters with waiting requests and none running, ready or not, in line order: the order
  // in which they will get slots. Ones late in it are the eviction candidates among non-idle ones.
  std::vector<std::string> pending_adapters() const;
  // LoRA adapters (not the base) with requests in the running batch, in the order they became
  // active: at most max_active_adapters.
  std::vector<std::string> active_adapters() const;
  size_t running_for(const std::string& adapter) const;
  size_t waiting_for(const std::string& adapter) const;
  // Waiting ids of one adapter in FIFO order (to fail them when its load fails).
  std::vector<uint64_t> waiting_ids(const std::string& adapter) const;
  // No waiting and no running request uses the adapter: safe to evict.
  bool idle(const std::string& adapter) const;

 private:
  struct Waiting {
    Request request;
    uint64_t seq = 0;  // arrival order
  };
  // One adapter's queue and slot; kept only while it has waiting or running requests.
  struct Adapter {
    std::deque<Waiting> waiting;
    size_t running = 0;
    double activated_s = 0;      // when it last became active
    uint64_t activated_seq = 0;  // orders active_adapters()
    // A later order than its head's arrival once it was cycled out: the back of the line.
    uint64_t turn = 0;
  };
  using AdapterMap = std::map<std::string, Adapter>;
  struct Running {
    Request request;
    std::vector<int32_t> blocks;
    int32_t tokens_scheduled = 0;  // the prefill's token plus one per decode step
  };
  struct Live {
    bool running = false;
    std::string adapter;
  };

  // The adapter queues whose heads are admitted now, in admission order (an adapter appears once
  // per admitted request), before TGI's ratio rule.
  std::vector<AdapterMap::iterator> select_admissions();
  // Position in line of an adapter with waiting requests (smaller = sooner).
  static uint64_t line_key(const Adapter& a);
  std::vector<Running>::iterator find_running(uint64_t id);
  void release(std::vector<Running>::iterator it);
  void forget_if_idle(AdapterMap::iterator it);

  SchedulerConfig config_;
  BlockAllocator blocks_;
  AdapterMap adapters_;
  std::unordered_set<std::string> ready_;    // adapters other than "" marked ready
  std::vector<Running> running_;             // in admission order, which is the decode order
  std::unordered_map<uint64_t, Live> live_;  // waiting or running ids
  size_t num_waiting_ = 0;
  size_t num_active_ = 0;  // LoRA adapters with running > 0
  uint64_t next_seq_ = 1;  // arrivals, activations and cycle-outs share one order
  double now_s_ = 0;       // the time of the last next_step
  int64_t reserved_tokens_ = 0;
  // TGI's `waiting_tokens`: tokens generated by the running batch since the last admission,
  // counting the admitting step's own token.
  int64_t tokens_since_admission_ = 0;
};

}  // namespace quilt
