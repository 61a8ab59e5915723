#pragma once
// Two kinds of checks (DESIGN.md):
//  - QUILT_REQUIRE: the caller's mistake (bad input, bad file, bad config). Throws quilt::Error
//    with a message that names the problem; the caller can recover and report it.
//  - QUILT_ASSERT: our own bug (a broken invariant). Prints file and line and aborts.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace quilt {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] inline void assert_fail(const char* cond, const char* file, int line,
                                     const std::string& msg) {
  std::fprintf(stderr, "quilt: internal error: %s:%d: assertion `%s` failed %s\n", file, line,
               cond, msg.c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace detail

}  // namespace quilt

#define QUILT_REQUIRE(cond, ...)                                      \
  do {                                                                \
    if (!(cond)) throw ::quilt::Error(::quilt::detail::concat(__VA_ARGS__)); \
  } while (0)

#define QUILT_FAIL(...) throw ::quilt::Error(::quilt::detail::concat(__VA_ARGS__))

#define QUILT_ASSERT(cond, ...)                                                              \
  do {                                                                                       \
    if (!(cond))                                                                             \
      ::quilt::detail::assert_fail(#cond, __FILE__, __LINE__,                                \
                                   ::quilt::detail::concat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
