#include "runtime/scheduler/placement.h"

#include <algorithm>
#include <limits>
#include <optional>

#include "runtime/core/check.h"

namespace quilt {

PlacementPolicy parse_placement_policy(std::string_view name) {
  if (name == "affinity") return PlacementPolicy::kAffinity;
  if (name == "round_robin") return PlacementPolicy::kRoundRobin;
  QUILT_FAIL("placement: expected 'affinity' or 'round_robin', got '", name, "'");
}

std::string_view to_string(PlacementPolicy policy) {
  switch (policy) {
    case PlacementPolicy::kAffinity:
      return "affinity";
    case PlacementPolicy::kRoundRobin:
      return "round_robin";
  }
  return "unknown";
}

Placement::Placement(PlacementConfig config) : config_(config) {
  QUILT_REQUIRE(config_.overload_slack >= 1, "placement: overload_slack must be >= 1 request, got ",
                config_.overload_slack);
}

PlacementDecision Placement::place(const std::string& adapter,
                                   std::span<const ReplicaView> replicas) {
  QUILT_REQUIRE(!replicas.empty(), "placement: no replicas to place a request on");
  const auto decision = [&](size_t r) {
    return PlacementDecision{static_cast<int>(r), !replicas[r].holds(adapter)};
  };
  if (config_.policy == PlacementPolicy::kRoundRobin) {
    const size_t r = next_ % replicas.size();
    next_ = r + 1;
    return decision(r);
  }

  size_t min_load = std::numeric_limits<size_t>::max();
  for (const auto& v : replicas) min_load = std::min(min_load, v.load());
  const size_t overloaded_at = min_load + static_cast<size_t>(config_.overload_slack);

  // The least-loaded replica among those `in_tier` admits; resident breaks ties before loading.
  const auto best = [&](auto&& in_tier) -> std::optional<size_t> {
    std::optional<size_t> out;
    for (size_t r = 0; r < replicas.size(); ++r) {
      const ReplicaView& v = replicas[r];
      if (v.load() >= overloaded_at || !in_tier(v)) continue;
      if (!out) {
        out = r;
        continue;
      }
      const ReplicaView& b = replicas[*out];
      const bool resident = adapter.empty() || v.resident.contains(adapter);
      const bool b_resident = adapter.empty() || b.resident.contains(adapter);
      if (v.load() < b.load() || (v.load() == b.load() && resident && !b_resident)) out = r;
    }
    return out;
  };
  if (const auto r = best([&](const ReplicaView& v) { return v.holds(adapter); })) {
    return decision(*r);
  }
  if (const auto r = best([](const ReplicaView& v) { return v.free_adapter_slots > 0; })) {
    return decision(*r);
  }
  const auto r = best([](const ReplicaView&) { return true; });
  QUILT_ASSERT(r.has_value(), "the least-loaded replica is never overloaded");
  return decision(*r);
}

}  // namespace quilt
