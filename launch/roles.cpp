#include "launch/roles.h"

#include <chrono>

#include "launch/init_model.h"
#include "model/gemma_model.h"
#include "runtime/comm/make_communicator.h"
#include "runtime/core/log.h"
#include "runtime/worker/worker.h"

namespace quilt {

JobLayout split_job(const ServeConfig& cfg, MPI_Comm world) {
  JobLayout l;
  MPI_Comm_rank(world, &l.world_rank);
  MPI_Comm_size(world, &l.world_size);
  QUILT_REQUIRE(l.world_size == cfg.world_size(), "this job has ", l.world_size,
                " MPI ranks but the config needs 1 coordinator + replicas (", cfg.replicas,
                ") x tensor_parallel (", cfg.tensor_parallel, ") = ", cfg.world_size(),
                ": run it with mpirun -np ", cfg.world_size());
  l.coordinator = l.world_rank == 0;
  if (!l.coordinator) {
    l.replica = (l.world_rank - 1) / cfg.tensor_parallel;
    l.tp_rank = (l.world_rank - 1) % cfg.tensor_parallel;
  }
  // The coordinator is in no replica communicator.
  MPI_Comm_split(world, l.coordinator ? MPI_UNDEFINED : l.replica, l.world_rank, &l.replica_comm);
  // Workers sharing a node take its GPUs in rank order.
  MPI_Comm workers = MPI_COMM_NULL, node = MPI_COMM_NULL;
  MPI_Comm_split(world, l.coordinator ? MPI_UNDEFINED : 0, l.world_rank, &workers);
  if (workers != MPI_COMM_NULL) {
    MPI_Comm_split_type(workers, MPI_COMM_TYPE_SHARED, l.world_rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &l.local_worker);
    MPI_Comm_free(&node);
    MPI_Comm_free(&workers);
  }
  return l;
}

std::string resolve_model_dir(const ServeConfig& cfg) {
  if (!cfg.model_path.empty()) return cfg.model_path;
  return default_model_dir(0);
}

void run_worker_role(const ServeConfig& cfg, const std::string& model_dir, const JobLayout& layout,
                     Transport& transport) {
  const GemmaConfig mcfg = GemmaConfig::from_file(model_dir + "/config.json");
  BackendOptions bo;
  bo.device = layout.local_worker;
  auto backend = make_backend(cfg.backend, bo);
  auto comm_ptr = make_communicator(*backend, layout.replica_comm);
  Communicator& comm = *comm_ptr;
  const Checkpoint ckpt = Checkpoint::open(model_dir);
  auto next = std::make_shared<int>(10);
  const bool talk = layout.tp_rank == 0;
  const auto t0 = std::chrono::steady_clock::now();
  GemmaForCausalLM model(mcfg, *backend, comm, ckpt, [&](size_t done, size_t total) {
    const int pct = total ? static_cast<int>(100.0 * done / total) : 100;
    // Small checkpoints load in a blink: report progress only for the big ones.
    if (!talk || total < (size_t{256} << 20) || (pct < *next && done != total)) return;
    while (*next <= pct) *next += 10;
    log::info("replica ", layout.replica, ": loading weights ", pct, "% (", done >> 20, " / ", total >> 20, " MiB)");
  });
  if (talk)
    log::info("replica ", layout.replica, ": loaded in ",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), " s, ",
              cfg.effective_kv_blocks(), " KV blocks of ", cfg.block_size, " tokens");
  AdapterStore adapters(model, *backend,
                        AdapterStoreOptions{cfg.adapter_slots, cfg.adapter_max_rank,
                                            static_cast<size_t>(cfg.adapter_host_cache_mb) << 20});
  if (talk && cfg.adapter_slots > 0)
    log::info("replica ", layout.replica, ": ", cfg.adapter_slots, " adapter slots of rank ", cfg.adapter_max_rank,
              " reserved (", adapters.reserved_bytes() >> 10, " KiB per rank)");
  ModelRunner runner(model, cfg.effective_kv_blocks(), cfg.block_size, load_eos_ids(model_dir, mcfg), layout.replica,
                     &adapters);
  WorkerOptions opt;
  opt.replica = layout.replica;
  opt.tp_rank = layout.tp_rank;
  opt.heartbeat_interval_s = cfg.heartbeat_interval_s;
  Worker(runner, transport, opt, &adapters).run();
}

}  // namespace quilt
