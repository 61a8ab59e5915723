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

// A worker rank's life: load the shard, size the KV cache (agree_kv_blocks), then run plans
// until Shutdown.
void run_worker_role(const ServeConfig& cfg, const std::string& model_dir, const JobLayout& layout,
                     Transport& transport, MPI_Comm world);

// Collective over `world` (the coordinator and every worker call it once, after the workers have
// loaded): the KV blocks every replica uses, the smallest `mine` of all ranks (the coordinator
// passes INT_MAX). Throws, naming the keys to change, when that cannot hold one request of
// limits.max_total_tokens.
int agree_kv_blocks(const ServeConfig& cfg, int mine, MPI_Comm world);

}  // namespace quilt
