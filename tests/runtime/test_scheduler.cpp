// The scheduler's oracle (DESIGN.md): tables of expected plans for scripted arrivals on a fake KV
// budget, plus a long seeded random run checked against the invariants every step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>
#include <map>
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

// ---------------------------------------------------------------------------------------------
// Scripted arrivals. Each row's events happen before that step's next_step(); the row then
// gives the plan expected (prefill ids in FIFO order, decode ids in admission order) and the free
// blocks after it. A step missing from a script must be a plain decode step: no admission, and
// every request running before it decodes (the runner checks this).

struct Event {
  enum Kind { kSubmit, kFinish, kCancel } kind;
  uint64_t id;
  int32_t prompt = 0;
  int32_t max_new = 0;
};
Event Submit(uint64_t id, int32_t prompt, int32_t max_new) {
  return {Event::kSubmit, id, prompt, max_new};
}
Event Finish(uint64_t id) { return {Event::kFinish, id}; }
Event Cancel(uint64_t id) { return {Event::kCancel, id}; }
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

struct Row {
  int step;
  std::vector<Event> events;
  std::vector<uint64_t> prefill;
  std::vector<uint64_t> decode;
  int32_t free_blocks;
  int waiting = -1;                                   // -1: not checked
  std::map<uint64_t, std::vector<int32_t>> blocks{};  // block tables expected for prefill ids
};

struct Script {
  std::string name;
  SchedulerConfig cfg;
  std::vector<Row> rows;
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
            const auto r =
                s.submit({.id = e.id, .prompt_tokens = e.prompt, .max_new_tokens = e.max_new});
            ASSERT_TRUE(r.ok()) << "submit " << e.id << ": " << r.reason;
            break;
          }
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
    const StepPlan plan = s.next_step();
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
};

struct Sim {
  Request req;
  int32_t target = 0;     // tokens after which the coordinator finishes it (eos or length)
  int32_t generated = 0;  // tokens produced so far
  enum State { kWaiting, kRunning, kFinished, kCancelled } state = kWaiting;
  bool admitted = false;
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
  std::deque<uint64_t> waiting;   // model of the FIFO queue
  std::vector<uint64_t> running;  // model of the batch, admission order
  std::vector<uint64_t> live;     // waiting or running, for picking cancel victims
  int64_t tokens_since_admission = 0;
  int submitted = 0, rejected = 0, finished = 0, cancelled = 0, steps = 0;
  size_t max_running_seen = 0, max_waiting_seen = 0;
  int held_back = 0, forced_joins = 0;  // steps where the ratio held a join back / was overridden

  auto blocks_for = [&](const Request& r) {
    return static_cast<int32_t>((int64_t{r.prompt_tokens} + r.max_new_tokens + cfg.block_size - 1) /
                                cfg.block_size);
  };
  auto forget = [&](uint64_t id) {
    std::erase(live, id);
    std::erase(running, id);
    std::erase(waiting, id);
  };

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
      Sim sim{.req = r, .target = rng.uniform(1, r.max_new_tokens)};
      sims.emplace(id, sim);
      waiting.push_back(id);
      live.push_back(id);
    }
    // Client disconnects, and now and then a cancel that races a finish.
    if (!live.empty() && rng.chance(rc.cancel_chance)) {
      const uint64_t id =
          live[static_cast<size_t>(rng.uniform(0, static_cast<int32_t>(live.size()) - 1))];
      ASSERT_TRUE(s.cancel(id));
      sims[id].state = Sim::kCancelled;
      forget(id);
      ++cancelled;
    }
    if (submitted > 0 && rng.chance(0.05)) {
      const uint64_t id = 1000 + static_cast<uint64_t>(rng.uniform(0, submitted - 1));
      if (std::find(live.begin(), live.end(), id) == live.end()) {
        ASSERT_FALSE(s.cancel(id));
      }
    }

    // What TGI's rule admits, from the model's own state.
    int64_t reserved = 0;
    int32_t used = 0;
    for (const auto id : running) {
      reserved += int64_t{sims[id].req.prompt_tokens} + sims[id].req.max_new_tokens;
      used += blocks_for(sims[id].req);
    }
    size_t fit = 0;
    {
      int64_t prefill_left = cfg.max_batch_prefill_tokens,
              tokens_left = cfg.max_batch_total_tokens - reserved;
      int64_t slots = cfg.max_running_requests - static_cast<int64_t>(running.size());
      int64_t blocks_left = cfg.num_blocks - used;
      for (const auto id : waiting) {
        const Request& r = sims[id].req;
        const int64_t t = int64_t{r.prompt_tokens} + r.max_new_tokens;
        if (slots < 1 || r.prompt_tokens > prefill_left || t > tokens_left ||
            blocks_for(r) > blocks_left)
          break;
        --slots, prefill_left -= r.prompt_tokens, tokens_left -= t, blocks_left -= blocks_for(r);
        ++fit;
      }
    }
    size_t expect_admit = fit;
    if (!running.empty()) {
      const bool forced = tokens_since_admission >= cfg.max_waiting_tokens;
      const auto min_join = static_cast<size_t>(
          std::floor(static_cast<double>(running.size()) * cfg.waiting_served_ratio));
      if (fit > 0 && fit < min_join) (forced ? forced_joins : held_back) += 1;
      if (!forced && fit < min_join) expect_admit = 0;
    }
    if (running.empty() && !waiting.empty()) {
      ASSERT_GT(fit, 0u) << "an idle replica cannot admit its head";
    }

    const StepPlan plan = s.next_step();
    ++steps;

    // Every running request decodes (the coordinator below never lets one exceed max_new).
    ASSERT_EQ(plan.decode, running);
    // Admission is the FIFO prefix TGI's rule gives.
    ASSERT_EQ(plan.prefill.size(), expect_admit);
    ASSERT_LE(plan.prefill_tokens(), cfg.max_batch_prefill_tokens);
    for (size_t i = 0; i < plan.prefill.size(); ++i) {
      const auto& p = plan.prefill[i];
      ASSERT_EQ(p.id, waiting.front());
      waiting.pop_front();
      Sim& sim = sims[p.id];
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
    max_waiting_seen = std::max(max_waiting_seen, waiting.size());
    ASSERT_EQ(s.num_running(), running.size());
    ASSERT_EQ(s.num_waiting(), waiting.size());
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
      sims[id].state = Sim::kFinished;
      forget(id);
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
  EXPECT_GT(finished, kRequests / 2);
  EXPECT_GT(max_running_seen, 1u);
  if (cfg.waiting_served_ratio > 1) {  // the run must have exercised both sides of the rule
    EXPECT_GT(held_back, 0);
    EXPECT_GT(forced_joins, 0);
  }
  std::printf(
      "%s: %d steps, %d finished, %d cancelled, %d rejected, max running %zu, "
      "max waiting %zu, held back %d, forced %d\n",
      rc.name.c_str(), steps, finished, cancelled, rejected, max_running_seen, max_waiting_seen,
      held_back, forced_joins);
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
                   0.005}),
    [](const testing::TestParamInfo<RandomCase>& info) { return info.param.name; });

}  // namespace
