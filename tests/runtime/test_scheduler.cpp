// The scheduler's oracle (DESIGN.md): tables of expected plans for scripted arrivals on a fake KV
// budget, scripted starvation runs (one hot adapter against 50 cold ones) with a stated bound on
// every wait, and long seeded random runs (random adapters and readiness flips) checked against
// the test's own model and the invariants every step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/core/check.h"
#include "runtime/scheduler/block_allocator.h"
#include "runtime/scheduler/scheduler.h"

using quilt::BlockAllocator;
using quilt::Request;
using quilt::Scheduler;
using quilt::SchedulerConfig;
using quilt::StepPlan;
using quilt::SubmitStatus;

namespace {

std::vector<uint64_t> range(uint64_t first, uint64_t last) {
  std::vector<uint64_t> v;
  for (uint64_t i = first; i <= last; ++i) v.push_back(i);
  return v;
}

std::vector<uint64_t> prefill_ids(const StepPlan& p) {
  std::vector<uint64_t> v;
  for (const auto& e : p.prefill) v.push_back(e.id);
  return v;
}

// ---------------------------------------------------------------------------------------------
// BlockAllocator

TEST(BlockAllocator, HandsOutDistinctBlocksInOrder) {
  BlockAllocator a(8);
  EXPECT_EQ(a.capacity(), 8);
  EXPECT_EQ(a.num_free(), 8);
  EXPECT_EQ(*a.allocate(3), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(*a.allocate(2), (std::vector<int32_t>{3, 4}));
  EXPECT_EQ(a.num_free(), 3);
  EXPECT_EQ(a.num_used(), 5);
  EXPECT_TRUE(a.is_used(4));
  EXPECT_FALSE(a.is_used(5));
  EXPECT_FALSE(a.is_used(-1));
  EXPECT_FALSE(a.is_used(8));
}

TEST(BlockAllocator, ZeroBlocksIsAnEmptyTable) {
  BlockAllocator a(2);
  const auto t = a.allocate(0);
  ASSERT_TRUE(t.has_value());
  EXPECT_TRUE(t->empty());
  EXPECT_EQ(a.num_free(), 2);
}

TEST(BlockAllocator, FailsAtomicallyWhenShort) {
  BlockAllocator a(4);
  ASSERT_TRUE(a.allocate(3).has_value());
  EXPECT_FALSE(a.allocate(2).has_value());
  EXPECT_EQ(a.num_free(), 1);  // nothing half-allocated
  EXPECT_EQ(*a.allocate(1), (std::vector<int32_t>{3}));
  EXPECT_FALSE(a.allocate(1).has_value());
}

TEST(BlockAllocator, FreedBlocksAreReusedInTheirOrder) {
  BlockAllocator a(6);
  const auto x = *a.allocate(2);  // 0 1
  const auto y = *a.allocate(3);  // 2 3 4
  a.free(y);
  EXPECT_EQ(a.num_free(), 4);
  EXPECT_EQ(*a.allocate(3), y);
  a.free(x);
  EXPECT_EQ(*a.allocate(3), (std::vector<int32_t>{0, 1, 5}));
  EXPECT_EQ(a.num_free(), 0);
}

TEST(BlockAllocator, BadFreeThrowsAndChangesNothing) {
  BlockAllocator a(4);
  const auto t = *a.allocate(2);  // 0 1
  const std::vector<int32_t> out_of_range{0, 4};
  const std::vector<int32_t> not_used{1, 2};
  const std::vector<int32_t> twice{0, 0};
  const std::vector<int32_t> negative{-1};
  EXPECT_THROW(a.free(out_of_range), quilt::Error);
  EXPECT_THROW(a.free(not_used), quilt::Error);
  EXPECT_THROW(a.free(twice), quilt::Error);
  EXPECT_THROW(a.free(negative), quilt::Error);
  EXPECT_EQ(a.num_free(), 2);
  EXPECT_TRUE(a.is_used(0));
  EXPECT_TRUE(a.is_used(1));
  a.free(t);
  EXPECT_EQ(a.num_free(), 4);
  EXPECT_THROW(a.free(t), quilt::Error);  // double free
}

TEST(BlockAllocator, RejectsBadSizes) {
  EXPECT_THROW(BlockAllocator(0), quilt::Error);
  EXPECT_THROW(BlockAllocator(-3), quilt::Error);
  BlockAllocator a(1);
  EXPECT_THROW(a.allocate(-1), quilt::Error);
}

// ---------------------------------------------------------------------------------------------
// Config and submit validation

TEST(SchedulerConfig, DefaultsAndDerivedTotalTokens) {
  const SchedulerConfig d;
  EXPECT_EQ(d.block_size, 16);
  EXPECT_EQ(d.max_batch_prefill_tokens, 4096);
  EXPECT_EQ(d.max_running_requests, 256);
  EXPECT_DOUBLE_EQ(d.waiting_served_ratio, 1.2);
  EXPECT_EQ(d.max_waiting_tokens, 20);
  EXPECT_EQ(d.max_active_adapters, 128);  // LoRAX's defaults
  EXPECT_DOUBLE_EQ(d.adapter_cycle_time_s, 2.0);
  const Scheduler s(SchedulerConfig{.block_size = 8, .num_blocks = 10});
  EXPECT_EQ(s.config().max_batch_total_tokens, 80);
  EXPECT_EQ(s.free_blocks(), 10);
  const Scheduler t(SchedulerConfig{.num_blocks = 10, .max_batch_total_tokens = 50});
  EXPECT_EQ(t.config().max_batch_total_tokens, 50);
}

TEST(SchedulerConfig, RejectsConfigsThatCanNeverWork) {
  const std::vector<std::pair<std::string, SchedulerConfig>> bad = {
      {"block_size", {.block_size = 0}},
      {"num_blocks", {.num_blocks = 0}},
      {"max_batch_prefill_tokens", {.max_batch_prefill_tokens = 0}},
      {"max_batch_total_tokens", {.max_batch_total_tokens = -1}},
      {"max_running_requests", {.max_running_requests = 0}},
      {"waiting_served_ratio", {.waiting_served_ratio = -0.5}},
      {"waiting_served_ratio", {.waiting_served_ratio = NAN}},
      {"max_waiting_tokens", {.max_waiting_tokens = -1}},
      {"max_active_adapters", {.max_active_adapters = 0}},
      {"adapter_cycle_time_s", {.adapter_cycle_time_s = -1}},
      {"adapter_cycle_time_s", {.adapter_cycle_time_s = INFINITY}},
  };
  for (const auto& [key, cfg] : bad) {
    try {
      Scheduler s(cfg);
      ADD_FAILURE() << key << " accepted";
    } catch (const quilt::Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  }
}

struct RejectCase {
  std::string name;
  SchedulerConfig cfg;
  int32_t prompt;
  int32_t max_new;
  SubmitStatus expect;
  std::string reason_names;  // a substring the reason must contain (the limit's name)
};

TEST(SchedulerSubmit, RefusesWhatCanNeverRunAndNamesTheLimit) {
  // 8 blocks of 16 = 128 tokens of KV.
  const SchedulerConfig base{.num_blocks = 8, .max_batch_prefill_tokens = 64};
  SchedulerConfig big_total = base;
  big_total.max_batch_total_tokens = 100000;
  SchedulerConfig small_total = base;
  small_total.max_batch_total_tokens = 100;
  const std::vector<RejectCase> cases = {
      {"empty prompt", base, 0, 10, SubmitStatus::kEmptyPrompt, "prompt"},
      {"negative prompt", base, -4, 10, SubmitStatus::kEmptyPrompt, "prompt"},
      {"zero max_new", base, 10, 0, SubmitStatus::kInvalidMaxNewTokens, "max_new_tokens"},
      {"negative max_new", base, 10, -1, SubmitStatus::kInvalidMaxNewTokens, "max_new_tokens"},
      {"prompt over prefill budget", base, 65, 1, SubmitStatus::kOverPrefillBudget,
       "max_batch_prefill_tokens (64)"},
      {"prompt at prefill budget", base, 64, 1, SubmitStatus::kQueued, ""},
      {"over total tokens", small_total, 50, 51, SubmitStatus::kOverMaxBatchTotalTokens,
       "max_batch_total_tokens (100)"},
      {"at total tokens", small_total, 50, 50, SubmitStatus::kQueued, ""},
      {"over default total = KV capacity", base, 60, 69, SubmitStatus::kOverMaxBatchTotalTokens,
       "max_batch_total_tokens (128)"},
      {"over KV blocks", big_total, 60, 69, SubmitStatus::kOverKvCapacity, "8 blocks"},
      {"at KV blocks", big_total, 60, 68, SubmitStatus::kQueued, ""},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Scheduler s(c.cfg);
    const auto r = s.submit({.id = 7, .prompt_tokens = c.prompt, .max_new_tokens = c.max_new});
    EXPECT_EQ(r.status, c.expect) << r.reason;
    EXPECT_EQ(r.ok(), c.expect == SubmitStatus::kQueued);
    if (c.expect == SubmitStatus::kQueued) {
      EXPECT_TRUE(r.reason.empty());
      EXPECT_EQ(s.num_waiting(), 1u);
      // What is accepted must be admitted when the replica is idle.
      EXPECT_EQ(prefill_ids(s.next_step()), std::vector<uint64_t>{7});
    } else {
      EXPECT_NE(r.reason.find(c.reason_names), std::string::npos) << r.reason;
      EXPECT_EQ(s.num_waiting(), 0u);
      EXPECT_FALSE(s.is_waiting(7));
      EXPECT_TRUE(s.next_step().empty());
    }
  }
}

TEST(SchedulerSubmit, DuplicateIdWhileWaitingOrRunningButReusableAfterFinish) {
  Scheduler s(SchedulerConfig{.num_blocks = 8});
  ASSERT_TRUE(s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4}).ok());
  EXPECT_EQ(s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4}).status,
            SubmitStatus::kDuplicateId);
  EXPECT_EQ(s.num_waiting(), 1u);
  (void)s.next_step();
  ASSERT_TRUE(s.is_running(1));
  const auto r = s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4});
  EXPECT_EQ(r.status, SubmitStatus::kDuplicateId);
  EXPECT_NE(r.reason.find("id 1"), std::string::npos) << r.reason;
  EXPECT_TRUE(s.finish(1));
  EXPECT_TRUE(s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4}).ok());
}

TEST(Scheduler, FinishAndCancelOfUnknownIdsChangeNothing) {
  Scheduler s(SchedulerConfig{.num_blocks = 8});
  EXPECT_FALSE(s.finish(42));
  EXPECT_FALSE(s.cancel(42));
  ASSERT_TRUE(s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4}).ok());
  EXPECT_FALSE(s.finish(1));  // waiting, not running: the coordinator cancels those instead
  EXPECT_TRUE(s.is_waiting(1));
  EXPECT_TRUE(s.cancel(1));
  EXPECT_FALSE(s.cancel(1));
  EXPECT_EQ(s.num_waiting(), 0u);
  EXPECT_TRUE(s.next_step().empty());
}

TEST(Scheduler, PlanCarriesAdapterPromptAndBlockTable) {
  Scheduler s(SchedulerConfig{.block_size = 4, .num_blocks = 8});
  s.set_ready("a/b", true);  // only ready adapters are admitted
  ASSERT_TRUE(s.submit({.id = 9, .prompt_tokens = 5, .max_new_tokens = 3, .adapter = "a/b"}).ok());
  const auto p = s.next_step();
  ASSERT_EQ(p.prefill.size(), 1u);
  EXPECT_EQ(p.prefill[0].id, 9u);
  EXPECT_EQ(p.prefill[0].prompt_tokens, 5);
  EXPECT_EQ(p.prefill[0].adapter, "a/b");
  EXPECT_EQ(p.prefill[0].blocks, (std::vector<int32_t>{0, 1}));  // 8 tokens = 2 blocks of 4
  EXPECT_EQ(p.prefill_tokens(), 5);
  const auto t = s.block_table(9);
  EXPECT_EQ(std::vector<int32_t>(t.begin(), t.end()), p.prefill[0].blocks);
  EXPECT_EQ(s.reserved_tokens(), 8);
  EXPECT_TRUE(s.block_table(10).empty());
}

TEST(SchedulerAdapters, ObserversReadinessAndTime) {
  Scheduler s(SchedulerConfig{.num_blocks = 64, .waiting_served_ratio = 0});
  EXPECT_TRUE(s.is_ready(""));
  s.set_ready("", true);  // a no-op
  EXPECT_THROW(s.set_ready("", false), quilt::Error);
  EXPECT_FALSE(s.is_ready("x"));
  s.set_ready("x", true);
  EXPECT_TRUE(s.is_ready("x"));
  EXPECT_TRUE(s.idle("x"));  // ready but unused: evictable
  ASSERT_TRUE(s.submit({.id = 1, .prompt_tokens = 4, .max_new_tokens = 4, .adapter = "x"}).ok());
  ASSERT_TRUE(s.submit({.id = 2, .prompt_tokens = 4, .max_new_tokens = 4, .adapter = "y"}).ok());
  ASSERT_TRUE(s.submit({.id = 3, .prompt_tokens = 4, .max_new_tokens = 4, .adapter = "x"}).ok());
  EXPECT_EQ(s.waiting_for("x"), 2u);
  EXPECT_EQ(s.waiting_ids("x"), (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(s.waiting_ids("y"), (std::vector<uint64_t>{2}));
  EXPECT_TRUE(s.waiting_ids("z").empty());
  EXPECT_FALSE(s.idle("x"));
  EXPECT_EQ(s.running_for("x"), 0u);
  EXPECT_EQ(s.wanted_adapters(), (std::vector<std::string>{"y"}));
  EXPECT_EQ(s.pending_adapters(), (std::vector<std::string>{"x", "y"}));  // in line order
  EXPECT_EQ(prefill_ids(s.next_step(1.0)), (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(s.pending_adapters(), (std::vector<std::string>{"y"}));
  EXPECT_EQ(s.running_for("x"), 2u);
  EXPECT_EQ(s.waiting_for("x"), 0u);
  EXPECT_FALSE(s.idle("x"));  // in use: never evict
  EXPECT_EQ(s.active_adapters(), (std::vector<std::string>{"x"}));
  EXPECT_THROW((void)s.next_step(0.5), quilt::Error);  // time went back
  EXPECT_THROW((void)s.next_step(NAN), quilt::Error);
  EXPECT_EQ(s.next_step().decode, (std::vector<uint64_t>{1, 3}));  // at 1.0 again
  ASSERT_TRUE(s.submit({.id = 4, .prompt_tokens = 4, .max_new_tokens = 1}).ok());
  EXPECT_EQ(prefill_ids(s.next_step()), (std::vector<uint64_t>{4}));
  EXPECT_EQ(s.running_for(""), 1u);
  EXPECT_EQ(s.active_adapters(), (std::vector<std::string>{"x"}));  // the base takes no slot
  EXPECT_TRUE(s.finish(4));
  EXPECT_TRUE(s.cancel(2));
  EXPECT_TRUE(s.idle("y"));
  EXPECT_TRUE(s.wanted_adapters().empty());
  s.set_ready("x", false);  // running requests go on; only admission stops
  EXPECT_EQ(s.next_step(2.0).decode, (std::vector<uint64_t>{1, 3}));
  EXPECT_TRUE(s.finish(1));
  EXPECT_EQ(s.running_for("x"), 1u);
  EXPECT_TRUE(s.cancel(3));
  EXPECT_TRUE(s.idle("x"));
  EXPECT_TRUE(s.active_adapters().empty());
  EXPECT_EQ(s.num_waiting(), 0u);
  EXPECT_EQ(s.free_blocks(), 64);
}

// ---------------------------------------------------------------------------------------------
// Scripted arrivals. Each row's events happen before that step's next_step(step * dt); the row
// then gives the plan expected (prefill ids in admission order, decode ids in admission order)
// and the free blocks after it. A step missing from a script must be a plain decode step: no
// admission, and every request running before it decodes (the runner checks this).

struct Event {
  enum Kind { kSubmit, kFinish, kCancel, kSetReady } kind;
  uint64_t id;
  int32_t prompt = 0;
  int32_t max_new = 0;
  std::string adapter{};
  bool ready = false;
};
Event Submit(uint64_t id, int32_t prompt, int32_t max_new, std::string adapter = "") {
  return {Event::kSubmit, id, prompt, max_new, std::move(adapter)};
}
Event Finish(uint64_t id) { return {Event::kFinish, id}; }
Event Cancel(uint64_t id) { return {Event::kCancel, id}; }
Event Ready(std::string adapter, bool ready = true) {
  return {Event::kSetReady, 0, 0, 0, std::move(adapter), ready};
}
std::vector<Event> SubmitMany(uint64_t first, uint64_t last, int32_t prompt, int32_t max_new) {
  std::vector<Event> v;
  for (uint64_t id = first; id <= last; ++id) v.push_back(Submit(id, prompt, max_new));
  return v;
}
std::vector<Event> FinishMany(uint64_t first, uint64_t last) {
  std::vector<Event> v;
  for (uint64_t id = first; id <= last; ++id) v.push_back(Finish(id));
  return v;
}
std::vector<Event> operator+(std::vector<Event> a, const std::vector<Event>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

struct Row {
  int step;
  std::vector<Event> events;
  std::vector<uint64_t> prefill;
  std::vector<uint64_t> decode;
  int32_t free_blocks;
  int waiting = -1;                                   // -1: not checked
  std::map<uint64_t, std::vector<int32_t>> blocks{};  // block tables expected for prefill ids
  std::optional<std::vector<std::string>> active{};   // active_adapters() after the step
  std::optional<std::vector<std::string>> wanted{};   // wanted_adapters() after the step
};

struct Script {
  std::string name;
  SchedulerConfig cfg;
  std::vector<Row> rows;
  double dt = 0;  // seconds between steps: step k runs at k * dt
};

// Budgets other than the one under test are made loose, and the ratio is 0 so that joining a
// running batch is never held back, unless the script is about the ratio.
constexpr int kLoose = 1000000;

// One row per step reads better than one field per line.
// clang-format off
std::vector<Script> scripts() {
  std::vector<Script> s;

  s.push_back({"EmptyQueueGivesEmptyPlans",
      {.num_blocks = 8},
      {
          {.step = 0, .events = {}, .prefill = {}, .decode = {}, .free_blocks = 8, .waiting = 0},
          {.step = 3, .events = {}, .prefill = {}, .decode = {}, .free_blocks = 8, .waiting = 0},
      }});

  // 40 + 40 = 80 fits 100, a third 40 does not; 60 + 40 = 100 fits exactly.
  s.push_back({"FifoUnderPrefillTokenBudget",
      {.num_blocks = 64, .max_batch_prefill_tokens = 100, .waiting_served_ratio = 0,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = SubmitMany(1, 3, 40, 8), .prefill = {1, 2}, .decode = {},
           .free_blocks = 58, .waiting = 1},
          {.step = 1, .events = {}, .prefill = {3}, .decode = {1, 2}, .free_blocks = 55,
           .waiting = 0},
          {.step = 2, .events = {Submit(4, 60, 8), Submit(5, 40, 8), Submit(6, 1, 8)},
           .prefill = {4, 5}, .decode = {1, 2, 3}, .free_blocks = 47, .waiting = 1},
          {.step = 3, .events = {}, .prefill = {6}, .decode = {1, 2, 3, 4, 5},
           .free_blocks = 46, .waiting = 0},
      }});

  // Reservations 100 + 80 = 180 of 200; the next (30) must wait for a finish; 30 + 70 fill the
  // freed room exactly.
  s.push_back({"FifoUnderTotalTokenBudget",
      {.num_blocks = 64, .max_batch_total_tokens = 200, .waiting_served_ratio = 0,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = {Submit(1, 50, 50), Submit(2, 60, 20), Submit(3, 10, 20)},
           .prefill = {1, 2}, .decode = {}, .free_blocks = 52, .waiting = 1},
          {.step = 1, .events = {}, .prefill = {}, .decode = {1, 2}, .free_blocks = 52,
           .waiting = 1},
          {.step = 2, .events = {Finish(2), Submit(4, 40, 30)}, .prefill = {3, 4},
           .decode = {1}, .free_blocks = 50, .waiting = 0},
      }});

  s.push_back({"FifoUnderRunningRequestBudget",
      {.num_blocks = 64, .max_running_requests = 3, .waiting_served_ratio = 0,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = SubmitMany(1, 5, 10, 5), .prefill = {1, 2, 3}, .decode = {},
           .free_blocks = 61, .waiting = 2},
          {.step = 1, .events = {}, .prefill = {}, .decode = {1, 2, 3}, .free_blocks = 61,
           .waiting = 2},
          {.step = 2, .events = {Finish(2)}, .prefill = {4}, .decode = {1, 3},
           .free_blocks = 61, .waiting = 1},
          {.step = 3, .events = {Cancel(1)}, .prefill = {5}, .decode = {3, 4},
           .free_blocks = 61, .waiting = 0},
      }});

  // Blocks round up: 17 tokens take 2 blocks of 16. 2 + 4 + 4 = 10 blocks, so request 4 (1 block)
  // waits until 1 finishes, then reuses 1's first block.
  s.push_back({"FifoUnderBlockBudget",
      {.num_blocks = 10, .max_batch_total_tokens = kLoose, .waiting_served_ratio = 0,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0,
           .events = {Submit(1, 16, 1), Submit(2, 48, 16), Submit(3, 50, 14), Submit(4, 1, 15)},
           .prefill = {1, 2, 3}, .decode = {}, .free_blocks = 0, .waiting = 1,
           .blocks = {{1, {0, 1}}, {2, {2, 3, 4, 5}}, {3, {6, 7, 8, 9}}}},
          {.step = 1, .events = {Finish(1)}, .prefill = {4}, .decode = {2, 3}, .free_blocks = 1,
           .waiting = 0, .blocks = {{4, {0}}}},
      }});

  // 2 (4 blocks) does not fit the 3 free blocks; 3 (1 block) would, but waits behind it.
  s.push_back({"HeadOfLineBlocksLaterUntilBlocksFree",
      {.num_blocks = 8, .waiting_served_ratio = 0, .max_waiting_tokens = 0},
      {
          {.step = 0, .events = {Submit(1, 64, 16)}, .prefill = {1}, .decode = {},
           .free_blocks = 3, .waiting = 0},
          {.step = 1, .events = {Submit(2, 48, 16), Submit(3, 10, 6)}, .prefill = {},
           .decode = {1}, .free_blocks = 3, .waiting = 2},
          {.step = 4, .events = {Finish(1)}, .prefill = {2, 3}, .decode = {}, .free_blocks = 3,
           .waiting = 0, .blocks = {{2, {0, 1, 2, 3}}, {3, {4}}}},
          {.step = 5, .events = {}, .prefill = {}, .decode = {2, 3}, .free_blocks = 3},
      }});

  // With 5 running, floor(5 * 1.2) = 6 must fit before any joins; the count is taken under the
  // budgets (here 20 running at most), so 13 waiting with 9 free slots still do not join.
  s.push_back({"WaitingServedRatioGatesJoining",
      {.num_blocks = 256, .max_running_requests = 20, .waiting_served_ratio = 1.2,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = SubmitMany(1, 5, 10, 100), .prefill = range(1, 5), .decode = {},
           .free_blocks = 256 - 5 * 7, .waiting = 0},
          {.step = 1, .events = SubmitMany(6, 10, 10, 100), .prefill = {}, .decode = range(1, 5),
           .free_blocks = 221, .waiting = 5},
          {.step = 2, .events = {Submit(11, 10, 100)}, .prefill = range(6, 11),
           .decode = range(1, 5), .free_blocks = 221 - 6 * 7, .waiting = 0},
          {.step = 3, .events = SubmitMany(12, 24, 10, 100), .prefill = {},
           .decode = range(1, 11), .free_blocks = 179, .waiting = 13},
          // 8 running: floor(9.6) = 9 must fit; 12 slots are free, so 12 join.
          {.step = 4, .events = FinishMany(1, 3), .prefill = range(12, 23),
           .decode = range(4, 11), .free_blocks = 179 + 3 * 7 - 12 * 7, .waiting = 1},
      }});

  // The ratio is never met (100 per running request); the batch joins after generating 3 tokens
  // since the last admission, the admitting step's token being the first.
  s.push_back({"MaxWaitingTokensForcesJoining",
      {.num_blocks = 64, .waiting_served_ratio = 100, .max_waiting_tokens = 3},
      {
          {.step = 0, .events = {Submit(1, 10, 100)}, .prefill = {1}, .decode = {},
           .free_blocks = 57},
          {.step = 1, .events = {Submit(2, 10, 100)}, .prefill = {}, .decode = {1},
           .free_blocks = 57, .waiting = 1},
          {.step = 3, .events = {}, .prefill = {2}, .decode = {1}, .free_blocks = 50,
           .waiting = 0},
          // The join reset the count.
          {.step = 4, .events = {Submit(3, 10, 100)}, .prefill = {}, .decode = {1, 2},
           .free_blocks = 50, .waiting = 1},
          {.step = 6, .events = {}, .prefill = {3}, .decode = {1, 2}, .free_blocks = 43},
      }});

  s.push_back({"MaxWaitingTokensZeroJoinsAtOnce",
      {.num_blocks = 64, .waiting_served_ratio = 100, .max_waiting_tokens = 0},
      {
          {.step = 0, .events = {Submit(1, 10, 100)}, .prefill = {1}, .decode = {},
           .free_blocks = 57},
          {.step = 1, .events = {Submit(2, 10, 100)}, .prefill = {2}, .decode = {1},
           .free_blocks = 50},
      }});

  // A forced join still respects the budgets: 2 waits for blocks past the forcing point.
  s.push_back({"ForcedJoinStillRespectsBudgets",
      {.num_blocks = 8, .waiting_served_ratio = 100, .max_waiting_tokens = 2},
      {
          {.step = 0, .events = {Submit(1, 64, 16)}, .prefill = {1}, .decode = {},
           .free_blocks = 3},
          {.step = 1, .events = {Submit(2, 48, 16)}, .prefill = {}, .decode = {1},
           .free_blocks = 3, .waiting = 1},
          {.step = 4, .events = {}, .prefill = {}, .decode = {1}, .free_blocks = 3,
           .waiting = 1},
          {.step = 6, .events = {Finish(1)}, .prefill = {2}, .decode = {}, .free_blocks = 4},
      }});

  s.push_back({"FinishedBlocksAreReusedByTheNextAdmission",
      {.num_blocks = 6, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = {Submit(1, 20, 12), Submit(2, 40, 8)}, .prefill = {1, 2},
           .decode = {}, .free_blocks = 1, .blocks = {{1, {0, 1}}, {2, {2, 3, 4}}}},
          {.step = 1, .events = {Submit(3, 40, 8)}, .prefill = {}, .decode = {1, 2},
           .free_blocks = 1, .waiting = 1},
          {.step = 2, .events = {Finish(2)}, .prefill = {3}, .decode = {1}, .free_blocks = 1,
           .blocks = {{3, {2, 3, 4}}}},
          {.step = 3, .events = {Finish(1), Submit(4, 16, 16)}, .prefill = {4}, .decode = {3},
           .free_blocks = 1, .blocks = {{4, {0, 1}}}},
      }});

  // Cancelling the waiting head lets the request behind it in.
  s.push_back({"CancelWaiting",
      {.num_blocks = 4, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = {Submit(1, 32, 16)}, .prefill = {1}, .decode = {},
           .free_blocks = 1},
          {.step = 1, .events = {Submit(2, 32, 16), Submit(3, 10, 6)}, .prefill = {},
           .decode = {1}, .free_blocks = 1, .waiting = 2},
          {.step = 2, .events = {Cancel(2)}, .prefill = {3}, .decode = {1}, .free_blocks = 0,
           .waiting = 0, .blocks = {{3, {3}}}},
      }});

  s.push_back({"CancelRunning",
      {.num_blocks = 4, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose},
      {
          {.step = 0, .events = {Submit(1, 32, 16), Submit(2, 10, 6)}, .prefill = {1, 2},
           .decode = {}, .free_blocks = 0},
          {.step = 1, .events = {Submit(3, 20, 12)}, .prefill = {}, .decode = {1, 2},
           .free_blocks = 0, .waiting = 1},
          {.step = 2, .events = {Cancel(1)}, .prefill = {3}, .decode = {2}, .free_blocks = 1,
           .blocks = {{3, {0, 1}}}},
          // Cancelled right after its prefill: it never decodes, its blocks come back.
          {.step = 3, .events = {Cancel(3)}, .prefill = {}, .decode = {2}, .free_blocks = 3},
      }});

  // A request gets its prefill token plus max_new - 1 decodes; its reservation has no room for
  // more, so it sits out until the coordinator finishes it.
  s.push_back({"DecodeStopsAtMaxNewTokens",
      {.block_size = 4, .num_blocks = 8, .waiting_served_ratio = 0},
      {
          {.step = 0, .events = {Submit(1, 4, 3), Submit(2, 4, 1)}, .prefill = {1, 2},
           .decode = {}, .free_blocks = 4},
          {.step = 1, .events = {}, .prefill = {}, .decode = {1}, .free_blocks = 4},
          {.step = 2, .events = {}, .prefill = {}, .decode = {1}, .free_blocks = 4},
          {.step = 3, .events = {}, .prefill = {}, .decode = {}, .free_blocks = 4},
          {.step = 4, .events = {Finish(1), Finish(2)}, .prefill = {}, .decode = {},
           .free_blocks = 8, .waiting = 0},
      }});

  // ---- Adapters. Requests of 10 + 16 tokens take 2 blocks; 40 + 8 take 3.

  // Heads are taken in arrival order across adapter queues, FIFO within each. 4 (10 tokens, b)
  // would fit beside 1 and 2, but 3 (a) came first and does not: head of line across adapters.
  s.push_back({"AdapterQueuesInterleaveByArrival",
      {.num_blocks = 64, .max_batch_prefill_tokens = 100, .waiting_served_ratio = 0,
       .max_waiting_tokens = kLoose},
      {
          {.step = 0,
           .events = {Ready("a"), Ready("b"), Submit(1, 40, 8, "a"), Submit(2, 40, 8, "b"),
                      Submit(3, 40, 8, "a"), Submit(4, 10, 8, "b")},
           .prefill = {1, 2}, .decode = {}, .free_blocks = 58, .waiting = 2,
           .active = {{"a", "b"}}},
          {.step = 1, .events = {}, .prefill = {3, 4}, .decode = {1, 2}, .free_blocks = 53,
           .waiting = 0, .active = {{"a", "b"}}},
      }});

  // Requests of adapters that are not ready wait without holding anyone up; wanted_adapters()
  // lists them by their oldest waiting request. Marking b not ready again stops its admissions
  // while its running requests go on.
  s.push_back({"NotReadyAdaptersWaitAndAreWantedOldestFirst",
      {.num_blocks = 64, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose},
      {
          {.step = 0,
           .events = {Ready("a"), Submit(1, 10, 16, "b"), Submit(2, 10, 16, "a"),
                      Submit(3, 10, 16, "c")},
           .prefill = {2}, .decode = {}, .free_blocks = 62, .waiting = 2,
           .active = {{"a"}}, .wanted = {{"b", "c"}}},
          {.step = 1, .events = {Ready("c")}, .prefill = {3}, .decode = {2}, .free_blocks = 60,
           .waiting = 1, .active = {{"a", "c"}}, .wanted = {{"b"}}},
          {.step = 2, .events = {Submit(4, 10, 16, "d"), Submit(5, 10, 16, "b")}, .prefill = {},
           .decode = {2, 3}, .free_blocks = 60, .waiting = 3, .wanted = {{"b", "d"}}},
          {.step = 3, .events = {Ready("b")}, .prefill = {1, 5}, .decode = {2, 3},
           .free_blocks = 56, .waiting = 1, .active = {{"a", "c", "b"}}, .wanted = {{"d"}}},
          {.step = 4, .events = {Ready("b", false), Submit(6, 10, 16, "b")}, .prefill = {},
           .decode = {2, 3, 1, 5}, .free_blocks = 56, .waiting = 2,
           .active = {{"a", "c", "b"}}, .wanted = {{"d", "b"}}},
      }});

  // Two adapters at most in the batch. c cannot get a slot and is passed over (4 and 5 of the
  // active adapters go ahead of it); it gets b's slot once b's requests finish. The base model
  // "" takes no slot.
  s.push_back({"MaxActiveAdaptersCapsDistinctAdaptersInTheBatch",
      {.num_blocks = 64, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose,
       .max_active_adapters = 2, .adapter_cycle_time_s = kLoose},
      {
          {.step = 0,
           .events = {Ready("a"), Ready("b"), Ready("c"), Submit(1, 10, 16, "a"),
                      Submit(2, 10, 16, "b"), Submit(3, 10, 16, "c"), Submit(4, 10, 16, "a")},
           .prefill = {1, 2, 4}, .decode = {}, .free_blocks = 58, .waiting = 1,
           .active = {{"a", "b"}}},
          {.step = 1, .events = {Submit(5, 10, 16, "b")}, .prefill = {5}, .decode = {1, 2, 4},
           .free_blocks = 56, .waiting = 1},
          {.step = 2, .events = {Finish(2), Finish(5)}, .prefill = {3}, .decode = {1, 4},
           .free_blocks = 58, .waiting = 0, .active = {{"a", "c"}}},
          {.step = 3, .events = {Submit(6, 10, 16, "")}, .prefill = {6}, .decode = {1, 4, 3},
           .free_blocks = 56, .waiting = 0, .active = {{"a", "c"}}},
          {.step = 4, .events = {Finish(1), Finish(4)}, .prefill = {}, .decode = {3, 6},
           .free_blocks = 60, .waiting = 0, .active = {{"c"}}},
      }});

  // One slot, a cycle of 1 s, 0.25 s per step. a keeps admitting while b waits until it has been
  // active for 1 s (step 4), then gives way. Once a's requests finish, b gets the slot; when b's
  // request finishes, c's request 7 goes before a's older request 6, because a was cycled out to
  // the back of the line (b, active for less than the cycle, was not).
  s.push_back({"CycleTimeRotatesAHotAdapterOutOfTheOnlySlot",
      {.num_blocks = 64, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose,
       .max_active_adapters = 1, .adapter_cycle_time_s = 1.0},
      {
          {.step = 0, .events = {Ready("a"), Ready("b"), Ready("c"), Submit(1, 10, 16, "a")},
           .prefill = {1}, .decode = {}, .free_blocks = 62, .active = {{"a"}}},
          {.step = 1, .events = {Submit(2, 10, 16, "a"), Submit(3, 10, 16, "b")},
           .prefill = {2}, .decode = {1}, .free_blocks = 60, .waiting = 1},
          {.step = 2, .events = {Submit(4, 10, 16, "a")}, .prefill = {4}, .decode = {1, 2},
           .free_blocks = 58},
          {.step = 3, .events = {Submit(5, 10, 16, "a")}, .prefill = {5}, .decode = {1, 2, 4},
           .free_blocks = 56},
          {.step = 4, .events = {Submit(6, 10, 16, "a"), Submit(7, 10, 16, "c")}, .prefill = {},
           .decode = {1, 2, 4, 5}, .free_blocks = 56, .waiting = 3, .active = {{"a"}}},
          {.step = 5, .events = FinishMany(1, 2) + FinishMany(4, 5), .prefill = {3}, .decode = {},
           .free_blocks = 62, .waiting = 2, .active = {{"b"}}},
          {.step = 6, .events = {Finish(3)}, .prefill = {7}, .decode = {}, .free_blocks = 62,
           .waiting = 1, .active = {{"c"}}},
          {.step = 7, .events = {Finish(7)}, .prefill = {6}, .decode = {}, .free_blocks = 62,
           .waiting = 0, .active = {{"a"}}},
      },
      0.25});

  // Cycling applies only while every slot is taken: at step 1 a (active 1 s > 0.5 s) still
  // admits beside b, because a slot was free. At step 2 c waits for a slot, so a and b both give
  // way; when b's request finishes, c takes b's slot (b was cycled out behind c) and a, no longer
  // holding anyone up, admits again.
  s.push_back({"CyclingOnlyWhileEverySlotIsTaken",
      {.num_blocks = 64, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose,
       .max_active_adapters = 2, .adapter_cycle_time_s = 0.5},
      {
          {.step = 0, .events = {Ready("a"), Ready("b"), Ready("c"), Submit(1, 10, 16, "a")},
           .prefill = {1}, .decode = {}, .free_blocks = 62},
          {.step = 1, .events = {Submit(2, 10, 16, "a"), Submit(3, 10, 16, "b")},
           .prefill = {2, 3}, .decode = {1}, .free_blocks = 58, .active = {{"a", "b"}}},
          {.step = 2,
           .events = {Submit(4, 10, 16, "c"), Submit(5, 10, 16, "a"), Submit(6, 10, 16, "b")},
           .prefill = {}, .decode = {1, 2, 3}, .free_blocks = 58, .waiting = 3},
          {.step = 3, .events = {Finish(3)}, .prefill = {4, 5}, .decode = {1, 2},
           .free_blocks = 56, .waiting = 1, .active = {{"a", "c"}}},
      },
      1.0});

  // An adapter waiting to be loaded (not ready) makes the others give way too: the coordinator
  // can only load it into a slot that an active adapter leaves. A slot that frees before it is
  // ready goes to the next ready adapter in line (a again, at step 2); once b is ready it is
  // ahead of a, which was cycled out.
  s.push_back({"AdapterWaitingToLoadAlsoCyclesOthersOut",
      {.num_blocks = 64, .waiting_served_ratio = 0, .max_waiting_tokens = kLoose,
       .max_active_adapters = 1, .adapter_cycle_time_s = 0.5},
      {
          {.step = 0, .events = {Ready("a"), Submit(1, 10, 16, "a")}, .prefill = {1},
           .decode = {}, .free_blocks = 62},
          {.step = 1, .events = {Submit(2, 10, 16, "b"), Submit(3, 10, 16, "a")}, .prefill = {},
           .decode = {1}, .free_blocks = 62, .waiting = 2, .active = {{"a"}},
           .wanted = {{"b"}}},
          {.step = 2, .events = {Finish(1)}, .prefill = {3}, .decode = {}, .free_blocks = 62,
           .waiting = 1, .active = {{"a"}}, .wanted = {{"b"}}},
          {.step = 3, .events = {Ready("b")}, .prefill = {}, .decode = {3}, .free_blocks = 62,
           .waiting = 1, .wanted = std::vector<std::string>{}},
          {.step = 4, .events = {Finish(3)}, .prefill = {2}, .decode = {}, .free_blocks = 62,
           .waiting = 0, .active = {{"b"}}},
      },
      1.0});

  return s;
}
// clang-format on

void PrintTo(const Script& s, std::ostream* os) { *os << s.name; }

class SchedulerScript : public testing::TestWithParam<Script> {};

TEST_P(SchedulerScript, PlansMatchTheTable) {
  const Script& script = GetParam();
  Scheduler s(script.cfg);
  std::map<int, const Row*> by_step;
  for (const auto& row : script.rows) {
    ASSERT_TRUE(by_step.emplace(row.step, &row).second) << "step " << row.step << " listed twice";
  }
  std::vector<uint64_t> running;  // after the previous step, in admission order
  for (int step = 0; step <= by_step.rbegin()->first; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto found = by_step.find(step);
    const Row* row = found == by_step.end() ? nullptr : found->second;
    if (row != nullptr) {
      for (const auto& e : row->events) {
        switch (e.kind) {
          case Event::kSubmit: {
            const auto r = s.submit({.id = e.id,
                                     .prompt_tokens = e.prompt,
                                     .max_new_tokens = e.max_new,
                                     .adapter = e.adapter});
            ASSERT_TRUE(r.ok()) << "submit " << e.id << ": " << r.reason;
            break;
          }
          case Event::kSetReady:
            s.set_ready(e.adapter, e.ready);
            break;
          case Event::kFinish:
            ASSERT_TRUE(s.finish(e.id)) << "finish " << e.id;
            std::erase(running, e.id);
            break;
          case Event::kCancel:
            ASSERT_TRUE(s.cancel(e.id)) << "cancel " << e.id;
            std::erase(running, e.id);
            break;
        }
      }
    }
    const StepPlan plan = s.next_step(step * script.dt);
    const auto admitted = prefill_ids(plan);
    if (row != nullptr) {
      EXPECT_EQ(admitted, row->prefill);
      EXPECT_EQ(plan.decode, row->decode);
      EXPECT_EQ(s.free_blocks(), row->free_blocks);
      if (row->waiting >= 0) {
        EXPECT_EQ(s.num_waiting(), static_cast<size_t>(row->waiting));
      }
      for (const auto& [id, table] : row->blocks) {
        const auto it = std::find_if(plan.prefill.begin(), plan.prefill.end(),
                                     [id = id](const auto& p) { return p.id == id; });
        ASSERT_NE(it, plan.prefill.end()) << "request " << id << " not prefilled";
        EXPECT_EQ(it->blocks, table) << "blocks of request " << id;
      }
      if (row->active) {
        EXPECT_EQ(s.active_adapters(), *row->active);
      }
      if (row->wanted) {
        EXPECT_EQ(s.wanted_adapters(), *row->wanted);
      }
    } else {
      EXPECT_TRUE(admitted.empty());
      EXPECT_EQ(plan.decode, running);
    }
    EXPECT_EQ(plan.empty(), admitted.empty() && plan.decode.empty());
    running.insert(running.end(), admitted.begin(), admitted.end());
    EXPECT_EQ(s.num_running(), running.size());
  }
}

INSTANTIATE_TEST_SUITE_P(Tables, SchedulerScript, testing::ValuesIn(scripts()),
                         [](const testing::TestParamInfo<Script>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// Starvation (issue 4, item 6): one hot adapter with arrivals at every step against 50 cold
// adapters with 1 to 3 requests each; every request is served, and every wait stays below a bound
// computed from the config.
//
// The bound. Step k runs at k * dt, and every request runs to its length. Token budgets are ample
// here, so only the adapter rules and TGI's ratio rule hold a request back. While a ready adapter
// waits for a slot, each slot turns over within P = T + M + W + 1 steps:
//   T = ceil(adapter_cycle_time_s / dt) + 1 steps in which an active adapter keeps admitting
//       (the +1 absorbs rounding of k * dt), after which it gives way;
//   M = max_new_tokens steps in which its last request then runs (the prefill and M - 1 decodes);
//   W = max_waiting_tokens steps for which the ratio rule may hold the next adapter's join back.
// Ahead of a waiting adapter for a slot are at most A = 50 + 2 adapters: every other cold one
// once, and the hot one at most twice (once with requests older than the waiting adapter's, all
// admitted in that turn, and once if it was cycled out before the waiting adapter came; after a
// turn of T steps it goes to the back). With S = max_active_adapters slots, a request is
// therefore admitted within
//   bound = (ceil((A + 1) / S) + 1) * P steps, that is bound * dt seconds.

struct StarvationCase {
  std::string name;
  int32_t max_active_adapters;
  double cycle_s;
  double dt;         // seconds per step (binary fractions keep k * dt exact)
  int cold_spacing;  // steps between two cold adapters' arrivals; 0 = all at once
};

void PrintTo(const StarvationCase& c, std::ostream* os) { *os << c.name; }

class SchedulerStarvation : public testing::TestWithParam<StarvationCase> {};

TEST_P(SchedulerStarvation, HotAdapterAgainstFiftyColdOnesEveryRequestServedInBoundedTime) {
  const StarvationCase& c = GetParam();
  constexpr int kCold = 50, kPrompt = 32, kMaxNew = 16, kHotPerStep = 2, kColdFrom = 40;
  Scheduler s(SchedulerConfig{.num_blocks = 1 << 16,
                              .max_batch_prefill_tokens = 1 << 20,
                              .max_running_requests = 1 << 14,
                              .max_active_adapters = c.max_active_adapters,
                              .adapter_cycle_time_s = c.cycle_s});
  const SchedulerConfig& cfg = s.config();  // TGI's ratio (1.2) and max_waiting_tokens (20)
  const int64_t T = static_cast<int64_t>(std::ceil(cfg.adapter_cycle_time_s / c.dt)) + 1;
  const int64_t P = T + kMaxNew + cfg.max_waiting_tokens + 1;
  const int64_t A = kCold + 2;
  const int64_t S = cfg.max_active_adapters;
  const int64_t bound = ((A + 1 + S - 1) / S + 1) * P;

  auto cold = [](int i) { return "cold-" + std::to_string(i); };
  s.set_ready("hot", true);
  for (int i = 0; i < kCold; ++i) s.set_ready(cold(i), true);

  struct Track {
    std::string adapter;
    int64_t submitted = 0, admitted = -1;
    int32_t generated = 0;
  };
  std::unordered_map<uint64_t, Track> reqs;
  std::vector<uint64_t> running;
  uint64_t next_id = 1;
  int cold_left = 0;  // cold requests not admitted yet
  int cold_submitted = 0;
  size_t max_active = 0;
  auto submit = [&](const std::string& adapter, int64_t step) {
    const uint64_t id = next_id++;
    const Request r{
        .id = id, .prompt_tokens = kPrompt, .max_new_tokens = kMaxNew, .adapter = adapter};
    ASSERT_TRUE(s.submit(r).ok());
    reqs[id] = {adapter, step};
  };

  int64_t step = 0;
  for (;; ++step) {
    ASSERT_LT(step, 100000) << "no progress";
    const bool cold_done = cold_submitted == kCold && cold_left == 0;
    if (!cold_done) {  // the hot adapter's traffic never pauses while cold ones wait
      for (int k = 0; k < kHotPerStep; ++k) submit("hot", step);
    }
    for (int i = 0; i < kCold; ++i) {
      if (step == kColdFrom + static_cast<int64_t>(i) * c.cold_spacing) {
        for (int k = 0; k <= i % 3; ++k, ++cold_left) submit(cold(i), step);
        ++cold_submitted;
      }
    }
    if (cold_done && s.num_waiting() == 0 && s.num_running() == 0) break;

    const StepPlan plan = s.next_step(static_cast<double>(step) * c.dt);
    ASSERT_EQ(plan.decode, running);
    for (const auto& p : plan.prefill) {
      Track& t = reqs.at(p.id);
      t.admitted = step;
      t.generated = 1;
      if (t.adapter != "hot") --cold_left;
      running.push_back(p.id);
    }
    for (const auto id : plan.decode) ++reqs.at(id).generated;
    ASSERT_LE(s.active_adapters().size(), static_cast<size_t>(S));
    max_active = std::max(max_active, s.active_adapters().size());
    std::vector<uint64_t> done;
    for (const auto id : running) {
      if (reqs.at(id).generated == kMaxNew) done.push_back(id);
    }
    for (const auto id : done) {
      ASSERT_TRUE(s.finish(id));
      std::erase(running, id);
    }
  }

  int64_t max_cold_wait = 0, max_hot_wait = 0;
  int hot = 0, cold_served = 0;
  for (const auto& [id, t] : reqs) {
    ASSERT_GE(t.admitted, t.submitted) << "request " << id << " of " << t.adapter
                                       << " never served";
    EXPECT_EQ(t.generated, kMaxNew);
    const int64_t wait = t.admitted - t.submitted;
    EXPECT_LT(wait, bound) << t.adapter << " request " << id << " waited " << wait
                           << " steps (" << wait * c.dt << " s), over the bound of " << bound
                           << " steps (" << bound * c.dt << " s)";
    if (t.adapter == "hot") {
      ++hot;
      max_hot_wait = std::max(max_hot_wait, wait);
    } else {
      ++cold_served;
      max_cold_wait = std::max(max_cold_wait, wait);
    }
  }
  int cold_expected = 0;
  for (int i = 0; i < kCold; ++i) cold_expected += i % 3 + 1;
  EXPECT_EQ(cold_served, cold_expected);
  EXPECT_GT(hot, 0);
  EXPECT_EQ(max_active, static_cast<size_t>(S));  // the slots were the bottleneck
  std::printf(
      "%s: %lld steps, %d hot and %d cold requests served; max wait cold %lld steps (%.3f s), "
      "hot %lld steps (%.3f s); bound %lld steps (%.3f s) = (ceil((%lld + 1) / %lld) + 1) * "
      "(T %lld + M %d + W %d + 1)\n",
      c.name.c_str(), static_cast<long long>(step), hot, cold_served,
      static_cast<long long>(max_cold_wait), max_cold_wait * c.dt,
      static_cast<long long>(max_hot_wait), max_hot_wait * c.dt, static_cast<long long>(bound),
      bound * c.dt, static_cast<long long>(A), static_cast<long long>(S),
      static_cast<long long>(T), kMaxNew, cfg.max_waiting_tokens);
  RecordProperty("max_cold_wait_steps", static_cast<int>(max_cold_wait));
  RecordProperty("bound_steps", static_cast<int>(bound));
}

INSTANTIATE_TEST_SUITE_P(
    Scripted, SchedulerStarvation,
    testing::Values(StarvationCase{"FourSlotsColdBurst", 4, 0.5, 1.0 / 16, 0},
                    StarvationCase{"FourSlotsColdTrickle", 4, 0.5, 1.0 / 16, 3},
                    StarvationCase{"FourSlotsNoCycleTime", 4, 0.0, 1.0 / 16, 0},
                    StarvationCase{"OneSlotColdBurst", 1, 0.25, 1.0 / 16, 0},
                    StarvationCase{"LoraxDefaultCycleColdTrickle", 4, 2.0, 1.0 / 32, 1}),
    [](const testing::TestParamInfo<StarvationCase>& info) { return info.param.name; });

// The same guarantee one level down, with residency in the loop: 4 adapter slots per replica
// (max_active_adapters = 4), all held by 4 hot adapters with arrivals at every step, and 10 cold
// adapters that are not loaded when their requests come. The coordinator's part is the rule the
// header recommends: load wanted adapters in wanted_adapters() order; with no free slot, evict the
// least recently used idle adapter, else the resident adapter without running requests that comes
// last in pending_adapters(), if it comes after the wanted one. The wanted adapter makes the hot
// ones give way although it is not ready, so a slot frees. The bound adds the load (L steps) to
// each turnover, and one turnover for a slot that frees while it is still loading:
//   bound = (ceil((A + 1) / S) + 2) * (P + L), A = 4 + 10 adapters.
TEST(SchedulerResidency, AdapterWaitingToLoadIsServedWhenEverySlotIsBusy) {
  constexpr int kSlots = 4, kHot = 4, kCold = 10, kMaxNew = 16, kLoad = 3;
  constexpr double kDt = 1.0 / 16;
  // Joins at every step (no ratio, no wait), so the hot adapters never drain on their own.
  Scheduler s(SchedulerConfig{.num_blocks = 1 << 14,
                              .max_running_requests = 1 << 12,
                              .waiting_served_ratio = 0,
                              .max_waiting_tokens = 0,
                              .max_active_adapters = kSlots,
                              .adapter_cycle_time_s = 0.25});
  const SchedulerConfig& cfg = s.config();
  const int64_t T = static_cast<int64_t>(std::ceil(cfg.adapter_cycle_time_s / kDt)) + 1;
  const int64_t P = T + kMaxNew + cfg.max_waiting_tokens + 1;
  const int64_t A = kHot + kCold;
  const int64_t bound = ((A + 1 + kSlots - 1) / kSlots + 2) * (P + kLoad);

  std::set<std::string> resident;
  std::map<std::string, int> loading;  // adapter -> steps left
  std::map<std::string, int64_t> last_used;
  for (int h = 0; h < kHot; ++h) {
    resident.insert("hot-" + std::to_string(h));
    s.set_ready("hot-" + std::to_string(h), true);
  }
  struct Track {
    std::string adapter;
    int64_t submitted = 0, admitted = -1;
    int32_t generated = 0;
  };
  std::unordered_map<uint64_t, Track> reqs;
  std::vector<uint64_t> running;
  uint64_t next_id = 1;
  int cold_served = 0, evictions = 0, loads = 0;
  int64_t step = 0;
  for (;; ++step) {
    ASSERT_LT(step, 100000) << "no progress";
    const bool cold_done = cold_served == kCold;
    for (int h = 0; h < kHot && !cold_done; ++h) {
      const uint64_t id = next_id++;
      const std::string a = "hot-" + std::to_string(h);
      ASSERT_TRUE(
          s.submit({.id = id, .prompt_tokens = 8, .max_new_tokens = kMaxNew, .adapter = a}).ok());
      reqs[id] = {a, step};
    }
    for (int c = 0; c < kCold; ++c) {
      if (step != 20 + 5 * c) continue;
      const uint64_t id = next_id++;
      const std::string a = "cold-" + std::to_string(c);
      ASSERT_TRUE(
          s.submit({.id = id, .prompt_tokens = 8, .max_new_tokens = kMaxNew, .adapter = a}).ok());
      reqs[id] = {a, step};
    }
    if (cold_done && s.num_waiting() == 0 && s.num_running() == 0) break;

    // The coordinator: finish loads, then start the ones the queue wants.
    for (auto it = loading.begin(); it != loading.end();) {
      if (--it->second > 0) {
        ++it;
        continue;
      }
      resident.insert(it->first);
      s.set_ready(it->first, true);
      it = loading.erase(it);
    }
    for (const auto& w : s.wanted_adapters()) {
      if (loading.contains(w)) continue;
      if (resident.size() + loading.size() >= static_cast<size_t>(kSlots)) {
        std::string victim;
        for (const auto& r : resident) {  // the least recently used idle adapter
          if (s.idle(r) && (victim.empty() || last_used[r] < last_used[victim])) victim = r;
        }
        if (victim.empty()) {  // else the one without running requests that comes last in line
          const auto line = s.pending_adapters();
          const auto pos = [&](const std::string& a) {
            return std::find(line.begin(), line.end(), a) - line.begin();
          };
          for (const auto& r : resident) {
            if (s.running_for(r) == 0 && pos(r) > pos(w) && (victim.empty() || pos(r) > pos(victim)))
              victim = r;
          }
        }
        if (victim.empty()) break;  // every slot is in use: wait for one to be given up
        resident.erase(victim);
        s.set_ready(victim, false);
        ++evictions;
      }
      loading[w] = kLoad;
      ++loads;
    }
    ASSERT_LE(resident.size() + loading.size(), static_cast<size_t>(kSlots));

    const StepPlan plan = s.next_step(static_cast<double>(step) * kDt);
    for (const auto& p : plan.prefill) {
      ASSERT_TRUE(resident.contains(p.adapter)) << p.adapter << " admitted while not resident";
      Track& t = reqs.at(p.id);
      t.admitted = step;
      t.generated = 1;
      last_used[p.adapter] = step;
      if (p.adapter.starts_with("cold")) ++cold_served;
      running.push_back(p.id);
    }
    for (const auto id : plan.decode) ++reqs.at(id).generated;
    std::vector<uint64_t> done;
    for (const auto id : running) {
      if (reqs.at(id).generated == kMaxNew) done.push_back(id);
    }
    for (const auto id : done) {
      ASSERT_TRUE(s.finish(id));
      std::erase(running, id);
    }
  }
  int64_t max_cold_wait = 0, max_hot_wait = 0;
  for (const auto& [id, t] : reqs) {
    ASSERT_GE(t.admitted, t.submitted) << t.adapter << " request " << id << " never served";
    const int64_t wait = t.admitted - t.submitted;
    EXPECT_LT(wait, bound) << t.adapter << " request " << id << " waited " << wait << " steps";
    (t.adapter.starts_with("cold") ? max_cold_wait : max_hot_wait) =
        std::max(wait, t.adapter.starts_with("cold") ? max_cold_wait : max_hot_wait);
  }
  EXPECT_GT(evictions, 0);
  std::printf(
      "residency: %lld steps, %zu requests, %d loads, %d evictions; max wait cold %lld steps, hot "
      "%lld steps; bound %lld steps = (ceil((%lld + 1) / %d) + 2) * (P %lld + L %d)\n",
      static_cast<long long>(step), reqs.size(), loads, evictions,
      static_cast<long long>(max_cold_wait), static_cast<long long>(max_hot_wait),
      static_cast<long long>(bound), static_cast<long long>(A), kSlots, static_cast<long long>(P),
      kLoad);
}

// ---------------------------------------------------------------------------------------------
// A long seeded run: random arrivals, sizes (some over the limits), early stops and cancels. The
// test keeps its own model of the queue and the batch and checks, every step, the plan against
// TGI's rule and the scheduler's state against the invariants.

// splitmix64: the same sequence on every platform, unlike std:: distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int32_t uniform(int32_t lo, int32_t hi) {  // inclusive
    return lo + static_cast<int32_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }

 private:
  uint64_t s_;
};

struct RandomCase {
  std::string name;
  SchedulerConfig cfg;
  uint64_t seed;
  int32_t max_prompt;
  int32_t max_new;
  double arrival_chance;  // per step; an arrival brings 1 to max_burst requests
  int32_t max_burst;
  double cancel_chance;  // per step
  // 0: every request is for the base model. Otherwise the base model "" and adapters a1..aN,
  // skewed towards low indices (a few hot adapters and a long cold tail).
  int32_t num_adapters = 0;
  double ready_flip_chance = 0;  // per step: one adapter's readiness flips
  double dt = 0;                 // mean seconds per step (each step takes 0.5 to 1.5 of it)
};

struct Sim {
  Request req;
  uint64_t seq = 0;       // arrival order, in the scheduler's shared order
  int32_t target = 0;     // tokens after which the coordinator finishes it (eos or length)
  int32_t generated = 0;  // tokens produced so far
  enum State { kWaiting, kRunning, kFinished, kCancelled } state = kWaiting;
  bool admitted = false;
};

// The test's model of one adapter, kept while it has waiting or running requests.
struct ModelAdapter {
  std::deque<uint64_t> waiting;
  size_t running = 0;
  double activated_s = 0;
  uint64_t activated_seq = 0;
  uint64_t turn = 0;  // set when cycled out: the back of the line for a slot
};

void PrintTo(const RandomCase& c, std::ostream* os) { *os << c.name; }

class SchedulerRandom : public testing::TestWithParam<RandomCase> {};

TEST_P(SchedulerRandom, InvariantsHoldAndEveryRequestIsServed) {
  const RandomCase& rc = GetParam();
  Scheduler s(rc.cfg);
  const SchedulerConfig& cfg = s.config();
  Rng rng(rc.seed);
  constexpr int kRequests = 2000;

  std::unordered_map<uint64_t, Sim> sims;
  std::map<std::string, ModelAdapter> adapters;  // model of the per-adapter queues
  std::set<std::string> ready;                   // adapters other than "" marked ready
  std::vector<uint64_t> running;                 // model of the batch, admission order
  std::vector<uint64_t> live;                    // waiting or running, for picking cancel victims
  size_t num_waiting = 0;
  uint64_t seq = 1;  // the scheduler orders arrivals, activations and cycle-outs in one sequence
  double now = 0;    // the time of the last step
  int64_t tokens_since_admission = 0;
  int submitted = 0, rejected = 0, finished = 0, cancelled = 0, steps = 0;
  size_t max_running_seen = 0, max_waiting_seen = 0, max_active_seen = 0;
  int held_back = 0, forced_joins = 0;  // steps where the ratio held a join back / was overridden
  int slot_waits = 0, gave_way = 0, cycle_outs = 0, not_ready_waits = 0, flips = 0;

  auto blocks_for = [&](const Request& r) {
    return static_cast<int32_t>((int64_t{r.prompt_tokens} + r.max_new_tokens + cfg.block_size - 1) /
                                cfg.block_size);
  };
  auto name = [](int32_t i) { return i == 0 ? std::string() : "a" + std::to_string(i); };
  auto is_ready = [&](const std::string& a) { return a.empty() || ready.contains(a); };
  auto set_ready = [&](const std::string& a, bool r) {
    s.set_ready(a, r);
    if (r) {
      ready.insert(a);
    } else {
      ready.erase(a);
    }
  };
  auto forget_if_idle = [&](const std::string& a) {
    const auto it = adapters.find(a);
    if (it != adapters.end() && it->second.running == 0 && it->second.waiting.empty())
      adapters.erase(it);
  };
  // A request leaves: from the batch (finish, cancel) or from its queue (cancel).
  auto forget = [&](uint64_t id) {
    Sim& sim = sims[id];
    ModelAdapter& m = adapters.at(sim.req.adapter);
    if (sim.state == Sim::kRunning) {
      if (--m.running == 0 && !sim.req.adapter.empty() &&
          now - m.activated_s >= cfg.adapter_cycle_time_s) {
        m.turn = seq++;
        ++cycle_outs;
      }
      std::erase(running, id);
    } else {
      std::erase(m.waiting, id);
      --num_waiting;
    }
    std::erase(live, id);
    forget_if_idle(sim.req.adapter);
  };
  for (int32_t i = 1; i <= rc.num_adapters; ++i) {
    if (rng.chance(0.5)) set_ready(name(i), true);
  }
  bool all_ready = false;

  while (submitted < kRequests || !live.empty()) {
    ASSERT_LT(steps, 2000000) << "no progress: starvation or a lost request";
    // Arrivals, each checked against the limits computed here independently.
    const int arrivals =
        submitted < kRequests && rng.chance(rc.arrival_chance) ? rng.uniform(1, rc.max_burst) : 0;
    for (int i = 0; i < arrivals && submitted < kRequests; ++i) {
      const uint64_t id = 1000 + static_cast<uint64_t>(submitted++);
      Request r{.id = id,
                .prompt_tokens = rng.uniform(1, rc.max_prompt),
                .max_new_tokens = rng.uniform(1, rc.max_new)};
      if (rc.num_adapters > 0) {
        r.adapter =
            name(std::min(rng.uniform(0, rc.num_adapters), rng.uniform(0, rc.num_adapters)));
      }
      const int64_t tokens = int64_t{r.prompt_tokens} + r.max_new_tokens;
      const bool fits = r.prompt_tokens <= cfg.max_batch_prefill_tokens &&
                        tokens <= cfg.max_batch_total_tokens && blocks_for(r) <= cfg.num_blocks;
      const auto res = s.submit(r);
      ASSERT_EQ(res.ok(), fits) << res.reason;
      if (!fits) {
        ++rejected;
        ASSERT_FALSE(res.reason.empty());
        continue;
      }
      Sim sim{.req = r, .seq = seq++, .target = rng.uniform(1, r.max_new_tokens)};
      adapters[r.adapter].waiting.push_back(id);
      ++num_waiting;
      sims.emplace(id, sim);
      live.push_back(id);
    }
    // Client disconnects, and now and then a cancel that races a finish.
    if (!live.empty() && rng.chance(rc.cancel_chance)) {
      const uint64_t id =
          live[static_cast<size_t>(rng.uniform(0, static_cast<int32_t>(live.size()) - 1))];
      ASSERT_TRUE(s.cancel(id));
      forget(id);
      sims[id].state = Sim::kCancelled;
      ++cancelled;
    }
    if (submitted > 0 && rng.chance(0.05)) {
      const uint64_t id = 1000 + static_cast<uint64_t>(rng.uniform(0, submitted - 1));
      if (std::find(live.begin(), live.end(), id) == live.end()) {
        ASSERT_FALSE(s.cancel(id));
      }
    }
    // The coordinator's residency at work: loads complete, idle (and now and then busy) adapters
    // are evicted. Once every request has arrived, everything becomes ready so the run drains.
    if (rc.num_adapters > 0) {
      if (submitted == kRequests && !all_ready) {
        for (int32_t i = 1; i <= rc.num_adapters; ++i) set_ready(name(i), true);
        all_ready = true;
      } else if (!all_ready && rng.chance(rc.ready_flip_chance)) {
        const std::string a = name(rng.uniform(1, rc.num_adapters));
        set_ready(a, !is_ready(a));
        ++flips;
      }
      now += rc.dt * (0.5 + rng.uniform(0, 100) / 100.0);
    }

    // What the policy admits, recomputed from the model: adapter heads by key, TGI's budgets.
    int64_t reserved = 0;
    int32_t used = 0;
    for (const auto id : running) {
      reserved += int64_t{sims[id].req.prompt_tokens} + sims[id].req.max_new_tokens;
      used += blocks_for(sims[id].req);
    }
    size_t num_active = 0;  // LoRA adapters only: the base takes no slot
    for (const auto& [a, m] : adapters) num_active += m.running > 0 && !a.empty() ? 1 : 0;
    const auto max_active = static_cast<size_t>(cfg.max_active_adapters);
    bool slot_wanted = false;
    bool ready_waiting = false;
    for (const auto& [a, m] : adapters) {
      if (m.waiting.empty()) continue;
      if (!a.empty() && m.running == 0 && num_active >= max_active) slot_wanted = true;
      if (!is_ready(a)) {
        ++not_ready_waits;
        continue;
      }
      ready_waiting = true;
    }
    slot_waits += slot_wanted ? 1 : 0;
    std::vector<uint64_t> expect;
    {
      int64_t prefill_left = cfg.max_batch_prefill_tokens,
              tokens_left = cfg.max_batch_total_tokens - reserved;
      int64_t slots = cfg.max_running_requests - static_cast<int64_t>(running.size());
      int64_t blocks_left = cfg.num_blocks - used;
      size_t free_active = max_active - num_active;
      std::map<std::string, size_t> taken;
      for (;;) {
        const std::string* best = nullptr;
        uint64_t best_key = UINT64_MAX;
        bool best_active = false;
        for (const auto& [a, m] : adapters) {
          const size_t t = taken[a];
          if (m.waiting.size() <= t || !is_ready(a)) continue;
          const bool active = a.empty() || m.running > 0 || t > 0;
          if (!a.empty() && m.running > 0 && slot_wanted &&
              now - m.activated_s >= cfg.adapter_cycle_time_s) {
            gave_way += t == 0 ? 1 : 0;
            continue;
          }
          if (!active && free_active == 0) continue;
          const uint64_t head = sims[m.waiting[t]].seq;
          const uint64_t key = active ? head : std::max(m.turn, head);
          if (key < best_key) best = &a, best_key = key, best_active = active;
        }
        if (best == nullptr) break;
        const Request& r = sims[adapters[*best].waiting[taken[*best]]].req;
        const int64_t t = int64_t{r.prompt_tokens} + r.max_new_tokens;
        if (slots < 1 || r.prompt_tokens > prefill_left || t > tokens_left ||
            blocks_for(r) > blocks_left)
          break;
        --slots, prefill_left -= r.prompt_tokens, tokens_left -= t, blocks_left -= blocks_for(r);
        if (!best_active) --free_active;
        expect.push_back(r.id);
        ++taken[*best];
      }
    }
    const size_t fit = expect.size();
    if (!running.empty()) {
      const bool forced = tokens_since_admission >= cfg.max_waiting_tokens;
      const auto min_join = static_cast<size_t>(
          std::floor(static_cast<double>(running.size()) * cfg.waiting_served_ratio));
      if (fit > 0 && fit < min_join) (forced ? forced_joins : held_back) += 1;
      if (!forced && fit < min_join) expect.clear();
    }
    if (running.empty() && ready_waiting) {
      ASSERT_GT(fit, 0u) << "an idle replica cannot admit its first ready head";
    }

    const StepPlan plan = rc.num_adapters > 0 ? s.next_step(now) : s.next_step();
    ++steps;

    // Every running request decodes (the coordinator below never lets one exceed max_new).
    ASSERT_EQ(plan.decode, running);
    // Admission is what the rule above gives, in its order.
    ASSERT_EQ(prefill_ids(plan), expect);
    ASSERT_LE(plan.prefill_tokens(), cfg.max_batch_prefill_tokens);
    for (const auto& p : plan.prefill) {
      Sim& sim = sims[p.id];
      ModelAdapter& m = adapters.at(sim.req.adapter);
      ASSERT_TRUE(is_ready(p.adapter)) << "request " << p.id << " of an adapter not ready";
      ASSERT_EQ(p.adapter, sim.req.adapter);
      ASSERT_EQ(m.waiting.front(), p.id) << "not the head of its adapter's queue";
      m.waiting.pop_front();
      --num_waiting;
      if (m.running++ == 0) {
        m.activated_s = now;
        m.activated_seq = seq++;
      }
      ASSERT_EQ(p.prompt_tokens, sim.req.prompt_tokens);
      ASSERT_EQ(static_cast<int32_t>(p.blocks.size()), blocks_for(sim.req));
      sim.state = Sim::kRunning;
      sim.admitted = true;
      running.push_back(p.id);
    }
    if (!plan.prefill.empty()) {
      tokens_since_admission = 1;
    } else if (!plan.decode.empty()) {
      ++tokens_since_admission;
    }

    // Invariants of the scheduler's state.
    max_running_seen = std::max(max_running_seen, running.size());
    max_waiting_seen = std::max(max_waiting_seen, num_waiting);
    ASSERT_EQ(s.num_running(), running.size());
    ASSERT_EQ(s.num_waiting(), num_waiting);
    ASSERT_LE(running.size(), static_cast<size_t>(cfg.max_running_requests));
    int64_t reserved_after = 0;
    int32_t used_after = 0;
    std::vector<bool> owned(static_cast<size_t>(cfg.num_blocks), false);
    for (const auto id : running) {
      const Request& r = sims[id].req;
      reserved_after += int64_t{r.prompt_tokens} + r.max_new_tokens;
      used_after += blocks_for(r);
      const auto table = s.block_table(id);
      ASSERT_EQ(static_cast<int32_t>(table.size()), blocks_for(r));
      for (const auto b : table) {
        ASSERT_TRUE(b >= 0 && b < cfg.num_blocks);
        ASSERT_FALSE(owned[static_cast<size_t>(b)]) << "block " << b << " in two tables";
        owned[static_cast<size_t>(b)] = true;
      }
    }
    ASSERT_EQ(s.reserved_tokens(), reserved_after);
    ASSERT_LE(reserved_after, cfg.max_batch_total_tokens);
    ASSERT_EQ(s.used_blocks(), used_after);
    ASSERT_LE(used_after, cfg.num_blocks);
    ASSERT_EQ(s.used_blocks() + s.free_blocks(), cfg.num_blocks);
    // The adapter observers against the model.
    std::vector<std::pair<uint64_t, std::string>> active, wanted, pending;
    for (const auto& [a, m] : adapters) {
      if (m.running > 0 && !a.empty()) active.emplace_back(m.activated_seq, a);
      if (!m.waiting.empty()) {
        const uint64_t head = sims[m.waiting.front()].seq;
        const uint64_t key = m.running > 0 ? head : std::max(m.turn, head);
        if (!is_ready(a)) wanted.emplace_back(key, a);
        if (m.running == 0 && !a.empty()) pending.emplace_back(key, a);
      }
      ASSERT_EQ(s.running_for(a), m.running) << a;
      ASSERT_EQ(s.waiting_for(a), m.waiting.size()) << a;
      ASSERT_FALSE(s.idle(a)) << a;
      ASSERT_EQ(s.waiting_ids(a), std::vector<uint64_t>(m.waiting.begin(), m.waiting.end()));
    }
    auto names = [](std::vector<std::pair<uint64_t, std::string>> v) {
      std::sort(v.begin(), v.end());
      std::vector<std::string> out;
      for (auto& e : v) out.push_back(std::move(e.second));
      return out;
    };
    const std::vector<std::string> active_names = names(active);
    ASSERT_EQ(s.active_adapters(), active_names);
    ASSERT_EQ(s.wanted_adapters(), names(wanted));
    ASSERT_EQ(s.pending_adapters(), names(pending));
    ASSERT_LE(active_names.size(), max_active);
    max_active_seen = std::max(max_active_seen, active_names.size());
    if (rc.num_adapters > 0) {
      const std::string a = name(rng.uniform(0, rc.num_adapters));
      ASSERT_EQ(s.idle(a), !adapters.contains(a)) << a;
      ASSERT_EQ(s.is_ready(a), is_ready(a)) << a;
    }

    // The workers' results: one token per row; the coordinator finishes on eos or length.
    for (const auto& p : plan.prefill) sims[p.id].generated = 1;
    for (const auto id : plan.decode) ++sims[id].generated;
    std::vector<uint64_t> done;
    for (const auto id : running) {
      Sim& sim = sims[id];
      ASSERT_LE(sim.generated, sim.req.max_new_tokens) << "request " << id << " ran past its KV";
      // KV written so far (prompt + all generated but the last) stays inside its blocks.
      ASSERT_LE(int64_t{sim.req.prompt_tokens} + sim.generated - 1,
                int64_t{blocks_for(sim.req)} * cfg.block_size);
      if (sim.generated == sim.target) done.push_back(id);
    }
    for (const auto id : done) {
      ASSERT_TRUE(s.finish(id));
      ASSERT_FALSE(s.finish(id));
      forget(id);
      sims[id].state = Sim::kFinished;
      ++finished;
    }
  }

  // Nothing lost: every accepted request was either cancelled or admitted and finished.
  EXPECT_EQ(submitted, kRequests);
  EXPECT_EQ(finished + cancelled + rejected, kRequests);
  for (const auto& [id, sim] : sims) {
    if (sim.state == Sim::kFinished) {
      EXPECT_TRUE(sim.admitted);
      EXPECT_EQ(sim.generated, sim.target);
    } else {
      EXPECT_EQ(sim.state, Sim::kCancelled) << "request " << id << " never served";
    }
  }
  EXPECT_EQ(s.num_waiting(), 0u);
  EXPECT_EQ(s.num_running(), 0u);
  EXPECT_EQ(s.free_blocks(), cfg.num_blocks);
  EXPECT_EQ(s.reserved_tokens(), 0);
  EXPECT_TRUE(s.active_adapters().empty());
  EXPECT_TRUE(s.wanted_adapters().empty());
  EXPECT_GT(finished, kRequests / 2);
  EXPECT_GT(max_running_seen, 1u);
  if (cfg.waiting_served_ratio > 1) {  // the run must have exercised both sides of the rule
    EXPECT_GT(held_back, 0);
    EXPECT_GT(forced_joins, 0);
  }
  if (rc.num_adapters > 0) {  // ... and the adapter rules
    EXPECT_GT(not_ready_waits, 0);
    EXPECT_GT(flips, 0);
    if (rc.num_adapters > cfg.max_active_adapters) {
      EXPECT_GT(slot_waits, 0);
      EXPECT_GT(gave_way, 0);
      EXPECT_GT(cycle_outs, 0);
      EXPECT_EQ(max_active_seen, static_cast<size_t>(cfg.max_active_adapters));
    }
  }
  std::printf(
      "%s: %d steps, %d finished, %d cancelled, %d rejected, max running %zu, "
      "max waiting %zu, held back %d, forced %d, max active adapters %zu, slot waits %d, "
      "gave way %d, cycle-outs %d, not-ready waits %d, readiness flips %d\n",
      rc.name.c_str(), steps, finished, cancelled, rejected, max_running_seen, max_waiting_seen,
      held_back, forced_joins, max_active_seen, slot_waits, gave_way, cycle_outs, not_ready_waits,
      flips);
  RecordProperty("steps", steps);
  RecordProperty("rejected", rejected);
  RecordProperty("cancelled", cancelled);
}

INSTANTIATE_TEST_SUITE_P(
    Seeded, SchedulerRandom,
    testing::Values(
        // Blocks are the scarce budget (512 tokens of KV); a few requests exceed it.
        RandomCase{"TightBlocks",
                   {.block_size = 8,
                    .num_blocks = 64,
                    .max_batch_prefill_tokens = 4096,
                    .waiting_served_ratio = 1.2,
                    .max_waiting_tokens = 5},
                   1,
                   64,
                   480,
                   0.02,
                   2,
                   0.002},
        // The prefill budget and the running-request cap bind; some prompts exceed the budget.
        RandomCase{"TightPrefillAndRunning",
                   {.block_size = 16,
                    .num_blocks = 1000,
                    .max_batch_prefill_tokens = 256,
                    .max_batch_total_tokens = 4000,
                    .max_running_requests = 8,
                    .waiting_served_ratio = 2.0,
                    .max_waiting_tokens = 10},
                   2,
                   300,
                   64,
                   0.5,
                   3,
                   0.005},
        // TGI's defaults on a small replica (4096 tokens of KV).
        RandomCase{"Defaults", {.num_blocks = 256}, 3, 600, 128, 0.5, 4, 0.005},
        // The same replica near saturation: the queue fills and drains.
        RandomCase{"DefaultsModerateLoad", {.num_blocks = 256}, 5, 600, 128, 0.12, 2, 0.005},
        // One-token blocks, no ratio and no wait: joins as soon as anything fits.
        RandomCase{"GreedyJoining",
                   {.block_size = 1,
                    .num_blocks = 2000,
                    .waiting_served_ratio = 0,
                    .max_waiting_tokens = 0},
                   4,
                   200,
                   100,
                   0.2,
                   3,
                   0.005},
        // Adapters: 12 and the base through 3 active slots with a short cycle; loads and
        // evictions flip readiness; TGI's defaults otherwise on a small replica.
        RandomCase{"AdaptersFewSlots",
                   {.num_blocks = 256, .max_active_adapters = 3, .adapter_cycle_time_s = 0.05},
                   6,
                   300,
                   64,
                   0.4,
                   3,
                   0.005,
                   12,
                   0.05,
                   0.01},
        // 40 adapters through 3 slots with tight KV: budgets and slots bind together.
        RandomCase{"AdaptersTightKv",
                   {.block_size = 8,
                    .num_blocks = 96,
                    .max_batch_prefill_tokens = 512,
                    .max_running_requests = 16,
                    .waiting_served_ratio = 1.2,
                    .max_waiting_tokens = 5,
                    .max_active_adapters = 3,
                    .adapter_cycle_time_s = 0.2},
                   7,
                   200,
                   128,
                   0.3,
                   2,
                   0.005,
                   40,
                   0.1,
                   0.02},
        // One slot and no cycle time: the replica gives way at every chance.
        RandomCase{"AdaptersOneSlotStrictRotation",
                   {.num_blocks = 512,
                    .waiting_served_ratio = 0,
                    .max_waiting_tokens = 0,
                    .max_active_adapters = 1,
                    .adapter_cycle_time_s = 0},
                   8,
                   100,
                   32,
                   0.3,
                   2,
                   0.002,
                   5,
                   0.02,
                   0.02}),
    [](const testing::TestParamInfo<RandomCase>& info) { return info.param.name; });

}  // namespace
