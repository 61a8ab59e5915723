#pragma once
#include <mpi.h>

#include <string>

namespace quilt {

struct ServeOptions {
  std::string config_path;  // empty: every key at its default
  std::string model_dir;    // overrides model.path
  std::string host;         // overrides http.host
  int port = -1;            // overrides http.port when >= 0
  bool print_config = false;
};

// `quilt serve`: rank 0 the coordinator (HTTP API), ranks 1.. the workers. Returns the exit code.
// SIGINT and SIGTERM must be blocked in every thread before MPI starts (main does it), so that
// rank 0 can take them with sigwait and shut the job down in order.
int run_serve(const ServeOptions& opt, MPI_Comm world);

}  // namespace quilt
