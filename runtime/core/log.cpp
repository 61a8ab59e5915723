#include "runtime/core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace quilt::log {
namespace {
// Logs go to stderr so that stdout stays clean for machine-readable output (--json).
std::shared_ptr<spdlog::logger>& logger() {
  static std::shared_ptr<spdlog::logger> l = [] {
    auto lg = spdlog::stderr_color_mt("quilt");
    lg->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    lg->set_level(spdlog::level::info);
    return lg;
  }();
  return l;
}
std::string& prefix() {
  static std::string p;
  return p;
}
}  // namespace

void set_level(Level level) {
  static const spdlog::level::level_enum map[] = {spdlog::level::debug, spdlog::level::info,
                                                  spdlog::level::warn, spdlog::level::err};
  logger()->set_level(map[static_cast<int>(level)]);
}

void set_rank(int rank, int world) {
  prefix() = world > 1 ? "[rank " + std::to_string(rank) + "/" + std::to_string(world) + "] " : "";
}

void write(Level level, const std::string& msg) {
  switch (level) {
    case Level::debug: logger()->debug("{}{}", prefix(), msg); break;
    case Level::info: logger()->info("{}{}", prefix(), msg); break;
    case Level::warn: logger()->warn("{}{}", prefix(), msg); break;
    case Level::error: logger()->error("{}{}", prefix(), msg); break;
  }
}

Level parse_level(const std::string& name) {
  if (name == "debug") return Level::debug;
  if (name == "info") return Level::info;
  if (name == "warn" || name == "warning") return Level::warn;
  if (name == "error") return Level::error;
  QUILT_FAIL("unknown log level '", name, "' (expected debug, info, warn or error)");
}

}  // namespace quilt::log
