#include "runtime/coordinator/adapter_source.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace quilt {
namespace fs = std::filesystem;

std::string default_hub_cache() {
  if (const char* c = std::getenv("HF_HUB_CACHE"); c && *c) return c;
  if (const char* h = std::getenv("HF_HOME"); h && *h) return (fs::path(h) / "hub").string();
  const char* home = std::getenv("HOME");
  return (fs::path(home ? home : "/root") / ".cache/huggingface/hub").string();
}

namespace {
bool is_adapter_dir(const fs::path& p) { return fs::is_regular_file(p / "adapter_config.json"); }

// True when `p` lies inside `root` once both are made canonical (symlinks resolved).
bool inside(const fs::path& p, const fs::path& root) {
  std::error_code ec;
  const fs::path cp = fs::weakly_canonical(p, ec);
  const fs::path cr = fs::weakly_canonical(root, ec);
  if (ec) return false;
  auto r = cr.begin(), q = cp.begin();
  for (; r != cr.end(); ++r, ++q)
    if (q == cp.end() || *q != *r) return false;
  return true;
}

bool safe_relative(const std::string& id) {
  if (id.empty() || id.front() == '/') return false;
  for (const auto& part : fs::path(id))
    if (part == ".." || part == ".") return false;
  return true;
}

std::string from_hub(const std::string& id, const std::string& cache) {
  // org/name -> models--org--name
  std::string repo = "models--";
  for (char c : id) repo += c == '/' ? std::string("--") : std::string(1, c);
  const fs::path base = fs::path(cache) / repo;
  std::ifstream ref(base / "refs" / "main");
  std::string rev;
  if (ref.good()) std::getline(ref, rev);
  if (!rev.empty() && is_adapter_dir(base / "snapshots" / rev)) return (base / "snapshots" / rev).string();
  return "";
}
}  // namespace

ResolvedAdapter resolve_adapter(const std::string& id, const std::string& source, const AdapterSourceConfig& cfg) {
  const std::string cache = cfg.hub_cache.empty() ? default_hub_cache() : cfg.hub_cache;
  if (source != "" && source != "local" && source != "hub")
    throw AdapterResolveError(400, "adapter_source '" + source + "' is not supported: use \"local\" or \"hub\" (there is no network at run time)");
  if (id.empty()) throw AdapterResolveError(400, "adapter_id is empty");
  if (source == "local" && id.front() == '/') {
    for (const auto& root : cfg.roots)
      if (inside(id, root)) {
        if (!is_adapter_dir(id)) throw AdapterResolveError(404, "adapter '" + id + "': no adapter_config.json in that folder");
        return {id, fs::weakly_canonical(id).string()};
      }
    throw AdapterResolveError(400, "adapter_source 'local': '" + id +
                                       "' is outside the configured adapter roots (adapters.roots); only folders inside them may be loaded");
  }
  if (!safe_relative(id)) throw AdapterResolveError(400, "adapter_id '" + id + "' must be a name like org/adapter, without '.' or '..' parts");
  if (source != "hub") {
    for (const auto& root : cfg.roots) {
      const fs::path p = fs::path(root) / id;
      if (is_adapter_dir(p) && inside(p, root)) return {id, fs::weakly_canonical(p).string()};
    }
    if (source == "local")
      throw AdapterResolveError(404, "adapter '" + id + "' was not found in the adapter roots (adapters.roots)");
  }
  if (const std::string p = from_hub(id, cache); !p.empty()) return {id, p};
  throw AdapterResolveError(404, "adapter '" + id + "' was not found " +
                                     (source == "hub" ? std::string("in the hub cache ") + cache
                                                      : "in the adapter roots (adapters.roots) or the hub cache " + cache) +
                                     " (there is no network at run time)");
}

}  // namespace quilt
