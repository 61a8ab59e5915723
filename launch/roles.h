#pragma once
// How `quilt serve` turns MPI ranks into roles: rank 0 the coordinator, ranks 1.. the workers,
// replica r owning ranks [1 + r * tp, 1 + (r + 1) * tp) with its own communicator.
#include <mpi.h>

#include <string>

#include "runtime/config/serve_config.h"
#include "runtime/transport/transport.h"

namespace quilt {

struct JobLayout {
  int world_rank = 0, world_size = 1;
  bool coordinator = true;
  int replica = -1;  // workers only
  int tp_rank = -1;
  int local_worker = -1;  // index among the worker ranks of this node: the GPU it takes
  MPI_Comm replica_comm = MPI_COMM_NULL;
};

// Collective over `world`. Throws, naming the expected rank count, when the world size does not
// match the config.
JobLayout split_job(const ServeConfig& cfg, MPI_Comm world);

// The configured model folder, or the embedded tiny model written to a temp folder.
std::string resolve_model_dir(const ServeConfig& cfg);

// A worker rank's life: load the shard, then run plans until Shutdown.
void run_worker_role(const ServeConfig& cfg, const std::string& model_dir, const JobLayout& layout,
                     Transport& transport);

}  // namespace quilt
