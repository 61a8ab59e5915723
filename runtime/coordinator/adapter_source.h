#pragma once
// Where an adapter_id points, with no network: configured adapter roots (folders of adapter
// folders) and an offline Hugging Face hub cache (models--org--name/snapshots/<rev>/, the
// revision read from refs/main).
#include <string>
#include <vector>

#include "runtime/coordinator/request.h"

namespace quilt {

struct AdapterSourceConfig {
  std::vector<std::string> roots;  // adapters.roots
  std::string hub_cache;           // adapters.hub_cache; empty = $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub
};

struct ResolvedAdapter {
  std::string id;    // as the request named it
  std::string path;  // the folder holding adapter_config.json
};

// source: "" (roots, then the hub cache), "local" (a path inside a root, or a name under one),
// or "hub". Throws AdapterResolveError carrying the HTTP status: 400 for a rule broken (path
// outside the roots, unknown source, bad id), 404 when nothing is found.
struct AdapterResolveError : std::runtime_error {
  AdapterResolveError(int status, const std::string& msg) : std::runtime_error(msg), status(status) {}
  int status;
};
ResolvedAdapter resolve_adapter(const std::string& adapter_id, const std::string& source,
                                const AdapterSourceConfig& cfg);

std::string default_hub_cache();

}  // namespace quilt
