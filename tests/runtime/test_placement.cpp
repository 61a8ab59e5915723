// The placement policy's oracle (DESIGN.md): tables of replica snapshots and the replica expected
// for a request, and a seeded run of R real schedulers showing that under affinity a hot adapter
// spreads to several replicas while a cold one stays on one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/core/check.h"
#include "runtime/scheduler/placement.h"
#include "runtime/scheduler/scheduler.h"

using quilt::Placement;
using quilt::PlacementConfig;
using quilt::PlacementDecision;
using quilt::PlacementPolicy;
using quilt::ReplicaView;

namespace {

// A replica snapshot in one line: load split as waiting/running, what it holds, free slots.
ReplicaView R(size_t waiting, size_t running, std::unordered_set<std::string> resident = {},
              std::unordered_set<std::string> loading = {}, int32_t free_slots = 4) {
  return {.waiting = waiting,
          .running = running,
          .resident = std::move(resident),
          .loading = std::move(loading),
          .free_adapter_slots = free_slots};
}

TEST(PlacementConfig, DefaultsParsingAndRefusals) {
  const PlacementConfig d;
  EXPECT_EQ(d.policy, PlacementPolicy::kAffinity);
  EXPECT_EQ(d.overload_slack, 16);
  EXPECT_EQ(quilt::parse_placement_policy("affinity"), PlacementPolicy::kAffinity);
  EXPECT_EQ(quilt::parse_placement_policy("round_robin"), PlacementPolicy::kRoundRobin);
  EXPECT_EQ(quilt::to_string(PlacementPolicy::kAffinity), "affinity");
  EXPECT_EQ(quilt::to_string(PlacementPolicy::kRoundRobin), "round_robin");
  for (const char* bad : {"", "Affinity", "round-robin", "random"}) {
    try {
      (void)quilt::parse_placement_policy(bad);
      ADD_FAILURE() << "'" << bad << "' accepted";
    } catch (const quilt::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("affinity"), std::string::npos) << what;
      EXPECT_NE(what.find("round_robin"), std::string::npos) << what;
    }
  }
  for (const int32_t slack : {0, -1}) {
    try {
      Placement p(PlacementConfig{.overload_slack = slack});
      ADD_FAILURE() << "overload_slack " << slack << " accepted";
    } catch (const quilt::Error& e) {
      EXPECT_NE(std::string(e.what()).find("overload_slack"), std::string::npos) << e.what();
    }
  }
  Placement p(PlacementConfig{});
  EXPECT_THROW((void)p.place("a", {}), quilt::Error);
}

// ---------------------------------------------------------------------------------------------
// Affinity: one request placed on a snapshot (overload_slack 4 unless the row says otherwise).

struct AffinityCase {
  std::string name;
  std::vector<ReplicaView> replicas;
  std::string adapter;
  int replica;
  bool needs_load;
  int32_t slack = 4;
};

// One row per case reads better than one field per line.
// clang-format off
std::vector<AffinityCase> affinity_cases() {
  return {
      {"ResidentAndNotOverloadedStays", {R(1, 2, {"a"}), R(0, 0)}, "a", 0, false},
      {"LoadingCountsAsHolding", {R(1, 1, {}, {"a"}), R(0, 0)}, "a", 0, false},
      // 3 + 4 = 7: a load of 7 is overloaded, 6 is not.
      {"OverloadedSpillsToLeastLoaded", {R(4, 4, {"a"}), R(0, 3), R(2, 2)}, "a", 1, true},
      {"JustUnderTheSlackStays", {R(3, 3, {"a"}), R(0, 3), R(2, 2)}, "a", 0, false},
      {"OverloadedLoadingAlsoSpills", {R(7, 0, {}, {"a"}), R(0, 3)}, "a", 1, true},
      // Among holders that are not overloaded, the least loaded; an idle replica without the
      // adapter does not win over a holder that is within the slack.
      {"LeastLoadedAmongHolders", {R(3, 2, {"a"}), R(1, 2, {"a"}), R(0, 0)}, "a", 1, false},
      {"SpillsOnlyWhenEveryHolderIsOverloaded", {R(4, 2, {"a"}), R(2, 2, {"a"}), R(0, 0)}, "a",
       2, true},
      // Equally busy everywhere: nothing to gain from loading it elsewhere.
      {"EquallyBusyStays", {R(10, 10, {"a"}), R(9, 9), R(10, 8)}, "a", 0, false},
      {"AbsentGoesToLeastLoaded", {R(3, 2, {"b"}), R(1, 1), R(2, 1)}, "a", 1, true},
      {"TieLowestIndex", {R(1, 1), R(2, 0), R(0, 2)}, "a", 0, true},
      {"TieBetweenHoldersResidentBeforeLoading", {R(1, 1, {}, {"a"}), R(2, 0, {"a"})}, "a", 1,
       false},
      {"TieBetweenHoldersLowestIndex", {R(1, 1, {"a"}), R(2, 0, {"a"})}, "a", 0, false},
      // A replica whose slots all hold adapters in use cannot load another until one goes idle.
      {"PrefersAReplicaWithAFreeSlot", {R(0, 1, {"b"}, {}, 0), R(1, 1, {}, {}, 1)}, "a", 1, true},
      {"NoFreeSlotAnywhereLeastLoaded", {R(2, 1, {"b"}, {}, 0), R(1, 1, {"c"}, {}, 0)}, "a", 1,
       true},
      // ... unless the one with a free slot is overloaded: then it waits for a slot where the
      // queue is short.
      {"FreeSlotButOverloaded", {R(0, 2, {"b"}, {}, 0), R(5, 5, {}, {}, 2)}, "a", 0, true},
      {"BaseModelIsEverywhere", {R(2, 2), R(1, 1, {}, {}, 0), R(3, 0)}, "", 1, false},
      {"OneReplica", {R(50, 50)}, "a", 0, true},
      {"OneReplicaResident", {R(50, 50, {"a"})}, "a", 0, false},
      // A slack of 1: any replica above the minimum is overloaded.
      {"SlackOneSpillsAtTheFirstDifference", {R(0, 2, {"a"}), R(1, 0)}, "a", 1, true, 1},
      {"LargeSlackKeepsAffinity", {R(40, 20, {"a"}), R(0, 0)}, "a", 0, false, 64},
  };
}
// clang-format on

void PrintTo(const AffinityCase& c, std::ostream* os) { *os << c.name; }

class PlacementAffinity : public testing::TestWithParam<AffinityCase> {};

TEST_P(PlacementAffinity, PicksTheReplicaOfTheTable) {
  const AffinityCase& c = GetParam();
  Placement p(PlacementConfig{.policy = PlacementPolicy::kAffinity, .overload_slack = c.slack});
  const PlacementDecision d = p.place(c.adapter, c.replicas);
  EXPECT_EQ(d.replica, c.replica);
  EXPECT_EQ(d.needs_load, c.needs_load);
  const PlacementDecision again = p.place(c.adapter, c.replicas);  // no hidden state
  EXPECT_EQ(again.replica, d.replica);
  EXPECT_EQ(again.needs_load, d.needs_load);
}

INSTANTIATE_TEST_SUITE_P(Tables, PlacementAffinity, testing::ValuesIn(affinity_cases()),
                         [](const testing::TestParamInfo<AffinityCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// Round robin: replicas in turn whatever they hold or how loaded they are.

TEST(PlacementRoundRobin, RotatesRegardlessOfResidencyAndLoad) {
  Placement p(PlacementConfig{.policy = PlacementPolicy::kRoundRobin});
  const std::vector<ReplicaView> three = {R(100, 100, {"a"}), R(0, 0), R(5, 5, {}, {"a"})};
  struct Row {
    std::string adapter;
    int replica;
    bool needs_load;
  };
  const std::vector<Row> rows = {
      {"a", 0, false}, {"a", 1, true}, {"a", 2, false},  // loading counts as holding
      {"b", 0, true},  {"", 1, false}, {"a", 2, false}, {"a", 0, false},
  };
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOPED_TRACE("placement " + std::to_string(i));
    const auto d = p.place(rows[i].adapter, three);
    EXPECT_EQ(d.replica, rows[i].replica);
    EXPECT_EQ(d.needs_load, rows[i].needs_load);
  }
  // The replica count may change between calls (a replica dropped out): the turn wraps.
  const std::vector<ReplicaView> two = {R(0, 0), R(0, 0)};
  EXPECT_EQ(p.place("a", two).replica, 1);
  EXPECT_EQ(p.place("a", two).replica, 0);
}

// ---------------------------------------------------------------------------------------------
// A seeded run: R replicas, each a real Scheduler, and the coordinator's residency in miniature
// (loads take a few steps, a load that finds no free slot evicts the least recently used idle
// adapter). A light phase, then a heavy one for the hot adapter; a cold adapter trickles
// throughout. Under affinity the hot adapter spreads to several replicas only once it is under
// load, and the cold one stays on a single replica; under round_robin the cold one is loaded
// everywhere.

class Rng {  // splitmix64
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int32_t uniform(int32_t lo, int32_t hi) {
    return lo + static_cast<int32_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }

 private:
  uint64_t s_;
};

struct SpreadResult {
  size_t hot_after_light = 0;  // replicas holding the hot adapter at the end of the light phase
  size_t hot_after_heavy = 0;  // ... at the end of the heavy phase
  size_t cold_max = 0;         // most replicas the cold adapter was ever held on at once
  int loads = 0, evictions = 0, served = 0, submitted = 0;
};

SpreadResult run_spread(PlacementPolicy policy, uint64_t seed) {
  constexpr int kReplicas = 4, kSlots = 4, kLoadSteps = 3;
  constexpr int kLightSteps = 400, kHeavySteps = 800, kDrainSteps = 2000;
  Rng rng(seed);
  Placement placement(PlacementConfig{.policy = policy});
  std::vector<std::unique_ptr<quilt::Scheduler>> scheds;
  std::vector<ReplicaView> views(kReplicas);
  std::vector<std::map<std::string, int>> loading(kReplicas);       // adapter -> steps left
  std::vector<std::map<std::string, int64_t>> last_use(kReplicas);  // resident -> step, for LRU
  for (int r = 0; r < kReplicas; ++r) {
    scheds.push_back(std::make_unique<quilt::Scheduler>(quilt::SchedulerConfig{
        .num_blocks = 4096, .max_running_requests = 8, .max_active_adapters = kSlots}));
  }
  struct Live {
    int replica;
    int32_t target, generated = 0;
  };
  std::unordered_map<uint64_t, Live> live;
  std::vector<std::vector<uint64_t>> running(kReplicas);
  SpreadResult out;
  uint64_t next_id = 1;
  auto holders = [&](const std::string& a) {
    size_t n = 0;
    for (const auto& v : views) n += v.holds(a) ? 1 : 0;
    return n;
  };

  for (int64_t step = 0; step < kLightSteps + kHeavySteps + kDrainSteps; ++step) {
    // Refresh the snapshots the coordinator would keep.
    for (int r = 0; r < kReplicas; ++r) {
      ReplicaView& v = views[r];
      v.waiting = scheds[r]->num_waiting();
      v.running = scheds[r]->num_running();
      int32_t idle = 0;
      for (const auto& a : v.resident) idle += scheds[r]->idle(a) ? 1 : 0;
      v.free_adapter_slots =
          kSlots - static_cast<int32_t>(v.resident.size() + v.loading.size()) + idle;
    }
    // Arrivals: the hot adapter, light then heavy; the cold one now and then; background noise.
    std::vector<std::string> arrivals;
    const bool light = step < kLightSteps, heavy = !light && step < kLightSteps + kHeavySteps;
    if (light ? rng.chance(0.2) : heavy) arrivals.push_back("hot");
    if (heavy && rng.chance(0.6)) arrivals.push_back("hot");
    if ((light || heavy) && rng.chance(0.05)) arrivals.push_back("cold");
    if ((light || heavy) && rng.chance(0.1))
      arrivals.push_back("bg" + std::to_string(rng.uniform(0, 5)));
    if ((light || heavy) && rng.chance(0.1)) arrivals.push_back("");
    for (const auto& a : arrivals) {
      const PlacementDecision d = placement.place(a, views);
      const int r = d.replica;
      if (d.needs_load) {
        ReplicaView& v = views[r];
        if (static_cast<int>(v.resident.size() + v.loading.size()) >= kSlots) {
          // Evict the least recently used idle adapter, if there is one; else the load waits.
          std::string victim;
          int64_t oldest = INT64_MAX;
          for (const auto& res : v.resident) {
            if (scheds[r]->idle(res) && last_use[r][res] < oldest)
              oldest = last_use[r][res], victim = res;
          }
          if (!victim.empty()) {
            v.resident.erase(victim);
            last_use[r].erase(victim);
            scheds[r]->set_ready(victim, false);
            ++out.evictions;
          }
        }
        if (static_cast<int>(v.resident.size() + v.loading.size()) < kSlots) {
          v.loading.insert(a);
          loading[r][a] = kLoadSteps;
          ++out.loads;
        }
      }
      const uint64_t id = next_id++;
      const int32_t max_new = rng.uniform(8, 40);
      EXPECT_TRUE(
          scheds[r]
              ->submit({.id = id, .prompt_tokens = 16, .max_new_tokens = max_new, .adapter = a})
              .ok());
      live[id] = {r, rng.uniform(1, max_new)};
      if (!a.empty()) last_use[r][a] = step;
      ++out.submitted;
    }
    // Loads in flight; a wanted adapter that could not get a slot at placement time retries.
    for (int r = 0; r < kReplicas; ++r) {
      for (auto it = loading[r].begin(); it != loading[r].end();) {
        if (--it->second > 0) {
          ++it;
          continue;
        }
        views[r].loading.erase(it->first);
        views[r].resident.insert(it->first);
        scheds[r]->set_ready(it->first, true);
        it = loading[r].erase(it);
      }
      for (const auto& w : scheds[r]->wanted_adapters()) {
        ReplicaView& v = views[r];
        if (v.holds(w) || static_cast<int>(v.resident.size() + v.loading.size()) >= kSlots)
          continue;
        v.loading.insert(w);
        loading[r][w] = kLoadSteps;
        ++out.loads;
      }
    }
    out.cold_max = std::max(out.cold_max, holders("cold"));
    if (step == kLightSteps - 1) out.hot_after_light = holders("hot");
    if (step == kLightSteps + kHeavySteps - 1) out.hot_after_heavy = holders("hot");
    // One step on every replica.
    for (int r = 0; r < kReplicas; ++r) {
      const auto plan = scheds[r]->next_step(static_cast<double>(step) * 0.02);
      for (const auto& p : plan.prefill) {
        live.at(p.id).generated = 1;
        running[r].push_back(p.id);
        if (!p.adapter.empty()) last_use[r][p.adapter] = step;
      }
      for (const auto id : plan.decode) ++live.at(id).generated;
      std::vector<uint64_t> done;
      for (const auto id : running[r]) {
        if (live.at(id).generated == live.at(id).target) done.push_back(id);
      }
      for (const auto id : done) {
        EXPECT_TRUE(scheds[r]->finish(id));
        std::erase(running[r], id);
        live.erase(id);
        ++out.served;
      }
    }
  }
  EXPECT_TRUE(live.empty()) << live.size() << " requests never served";
  return out;
}

TEST(PlacementSeeded, AffinitySpreadsAHotAdapterUnderLoadAndKeepsAColdOneOnOneReplica) {
  const SpreadResult a = run_spread(PlacementPolicy::kAffinity, 11);
  std::printf(
      "affinity: %d requests, %d served, %d loads, %d evictions; hot adapter on %zu replica(s) "
      "after the light phase, %zu after the heavy one; cold adapter on at most %zu\n",
      a.submitted, a.served, a.loads, a.evictions, a.hot_after_light, a.hot_after_heavy,
      a.cold_max);
  EXPECT_EQ(a.served, a.submitted);
  EXPECT_EQ(a.hot_after_light, 1u);
  EXPECT_GE(a.hot_after_heavy, 3u);
  EXPECT_EQ(a.cold_max, 1u);

  const SpreadResult rr = run_spread(PlacementPolicy::kRoundRobin, 11);
  std::printf(
      "round_robin: %d requests, %d served, %d loads, %d evictions; hot adapter on %zu "
      "replica(s) after the light phase, %zu after the heavy one; cold adapter on at most %zu\n",
      rr.submitted, rr.served, rr.loads, rr.evictions, rr.hot_after_light, rr.hot_after_heavy,
      rr.cold_max);
  EXPECT_EQ(rr.served, rr.submitted);
  EXPECT_GT(rr.cold_max, 1u);  // round robin loads it wherever its requests land
  EXPECT_GT(rr.loads, a.loads);
}

}  // namespace
