#pragma once
// The one logging seam: spdlog stays behind this header's implementation file.
#include <string>

#include "runtime/core/check.h"

namespace quilt::log {

enum class Level { debug, info, warn, error };

void set_level(Level level);
// Prefix every line with this rank's role, e.g. "rank 1/3".
void set_rank(int rank, int world);
void write(Level level, const std::string& msg);

template <typename... Args>
void debug(Args&&... a) { write(Level::debug, detail::concat(a...)); }
template <typename... Args>
void info(Args&&... a) { write(Level::info, detail::concat(a...)); }
template <typename... Args>
void warn(Args&&... a) { write(Level::warn, detail::concat(a...)); }
template <typename... Args>
void error(Args&&... a) { write(Level::error, detail::concat(a...)); }

Level parse_level(const std::string& name);

}  // namespace quilt::log
