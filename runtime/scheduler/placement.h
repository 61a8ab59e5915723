#pragma once
// Which replica serves a request (issue 4, item 7). A pure policy object, like the scheduler: the
// coordinator passes a value snapshot of every replica and gets a replica index back, plus whether
// the adapter must be loaded there. Residency itself (loads, evictions) stays the coordinator's.
//
// affinity, in three tiers, the least-loaded replica of the first tier that has one:
//  1. replicas that hold the adapter (resident, or loading) and are not overloaded;
//  2. replicas that can take another adapter now (free_adapter_slots > 0) and are not overloaded:
//     the adapter is loaded there;
//  3. every replica that is not overloaded (the least loaded has no free slot either: the load
//     waits there until one of its adapters goes idle).
//  Load is waiting + running requests. A replica is overloaded when its load is at least
//  overload_slack more than the least-loaded replica's. The rule is relative on purpose: when every
//  replica is equally busy, a request stays where its adapter already is (loading it elsewhere
//  would not get it served sooner), and an adapter spreads only when the queue of the replicas
//  that hold it runs ahead of the others. So a hot adapter ends up resident on several replicas,
//  while a cold one stays on the replica that first loaded it.
//  Ties: resident before loading (tier 1), then the lowest index.
// round_robin: replicas in turn, whatever they hold or load.
//
// The base model "" is resident on every replica whatever the snapshot says.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_set>

namespace quilt {

enum class PlacementPolicy { kAffinity, kRoundRobin };

// "affinity" or "round_robin"; anything else is refused with a message naming both.
PlacementPolicy parse_placement_policy(std::string_view name);
std::string_view to_string(PlacementPolicy policy);

// Every key has a default and a unit.
struct PlacementConfig {
  // `placement` in the config.
  PlacementPolicy policy = PlacementPolicy::kAffinity;
  // Requests (waiting + running) by which a replica must exceed the least-loaded replica to count
  // as overloaded for affinity (>= 1).
  int32_t overload_slack = 16;
};

// What placement needs to know of one replica, as the coordinator sees it now.
struct ReplicaView {
  size_t waiting = 0;                        // requests queued on the replica's scheduler
  size_t running = 0;                        // requests in its running batch
  std::unordered_set<std::string> resident;  // adapters whose weights are in its slots
  std::unordered_set<std::string> loading;   // adapters being loaded into its slots
  // Adapter slots that can take another adapter now: empty, or holding an idle adapter (no
  // waiting or running request) that may be evicted.
  int32_t free_adapter_slots = 0;

  size_t load() const { return waiting + running; }
  bool holds(const std::string& adapter) const {
    return adapter.empty() || resident.contains(adapter) || loading.contains(adapter);
  }
};

struct PlacementDecision {
  int replica = 0;
  bool needs_load = false;  // the adapter is neither resident nor loading there: start a load
};

class Placement {
 public:
  // Throws quilt::Error for a config that can never work (overload_slack < 1).
  explicit Placement(PlacementConfig config);

  // Chooses the replica for one request of `adapter` ("" = the base model). `replicas` must not
  // be empty. Only round_robin keeps state (its turn), so the same snapshot gives the same answer
  // under affinity.
  PlacementDecision place(const std::string& adapter, std::span<const ReplicaView> replicas);

  const PlacementConfig& config() const { return config_; }

 private:
  PlacementConfig config_;
  size_t next_ = 0;  // round_robin's next replica
};

}  // namespace quilt
