#include "launch/roles.h"

#include <chrono>
#include <climits>

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

int agree_kv_blocks(const ServeConfig& cfg, int mine, MPI_Comm world) {
  int agreed = 0;
  MPI_Allreduce(&mine, &agreed, 1, MPI_INT, MPI_MIN, world);
  const int64_t need = (static_cast<int64_t>(cfg.max_total_tokens) + cfg.block_size - 1) / cfg.block_size;
  QUILT_REQUIRE(agreed >= need, "the KV cache holds ", agreed, " blocks of ", cfg.block_size,
                " tokens on the smallest GPU, fewer than the ", need, " blocks one request of limits.max_total_tokens (",
                cfg.max_total_tokens, ") needs: raise cuda.gpu_memory_fraction (", cfg.gpu_memory_fraction,
                "), lower limits.max_total_tokens, scheduler.max_batch_prefill_tokens or cuda.graphs_max_batch, "
                "use more tensor_parallel ranks, or set scheduler.kv_blocks");
  return agreed;
}

namespace {

// The KV blocks this rank can hold. On the cpu backend: the configured count. On the cuda
// backend: after a warm-up at the largest step the config allows (a prefill of
// scheduler.max_batch_prefill_tokens tokens with logits for every row, as prompt logprobs need,
// and a decode of cuda.graphs_max_batch rows), so that the memory pool holds the activation
// peak, the blocks that fit in gpu_memory_fraction of the GPU. A configured scheduler.kv_blocks
// is checked against that instead of replacing it.
int size_kv_blocks(const ServeConfig& cfg, GemmaForCausalLM& model, Backend& backend, bool talk, int replica) {
  if (cfg.backend != "cuda") return cfg.effective_kv_blocks();
  const int bs = cfg.block_size;
  {
    const int T = static_cast<int>(cfg.max_batch_prefill_tokens);
    const int B = std::max(1, cfg.cuda_graphs_max_batch);
    const int nb = (std::max(T, 2) + bs - 1) / bs;
    KvCache scratch = model.allocate_kv_cache(std::max(nb, B), bs);
    ForwardInputs in;
    in.max_blocks_per_seq = nb;
    in.cu_seqlen_prefill = {0, T};
    in.seqlen = {T};
    in.max_s = T;
    for (int t = 0; t < T; ++t) {
      in.input_ids.push_back(0);
      in.position_ids.push_back(t);
      in.slots.push_back(t);
    }
    for (int k = 0; k < nb; ++k) in.block_tables.push_back(k);
    model.forward(in, scratch);  // logits for every row
    if (cfg.cuda_graphs_max_batch > 0) {
      ForwardInputs d;
      d.max_blocks_per_seq = 1;
      d.cu_seqlen_prefill.push_back(0);
      for (int b = 0; b < B; ++b) {
        d.input_ids.push_back(0);
        d.position_ids.push_back(0);
        d.slots.push_back(b * bs);
        d.cu_seqlen_prefill.push_back(b + 1);
        d.seqlen.push_back(1);
        d.block_tables.push_back(b);
      }
      d.max_s = 1;
      model.forward(d, scratch);  // the largest graph bucket's tensors
    }
  }
  const auto [free_b, total_b] = backend.memory_info();
  const double used = static_cast<double>(total_b - free_b);
  const double budget = cfg.gpu_memory_fraction * static_cast<double>(total_b) - used;
  const size_t per_block = model.kv_bytes_per_block(bs);
  const int64_t fit = budget > 0 ? static_cast<int64_t>(budget / static_cast<double>(per_block)) : 0;
  const int blocks = static_cast<int>(std::min<int64_t>(fit, INT_MAX / 2));
  // The scheduler never reserves more than max_batch_total_tokens: blocks past that would sit unused.
  const int usable = static_cast<int>(std::min<int64_t>(blocks, (cfg.max_batch_total_tokens + bs - 1) / bs));
  if (talk)
    log::info("replica ", replica, ": GPU memory ", static_cast<int64_t>(used) >> 20, " MiB used after warm-up of ",
              total_b >> 20, " MiB; cuda.gpu_memory_fraction ", cfg.gpu_memory_fraction, " leaves room for ", blocks,
              " KV blocks (", per_block >> 10, " KiB each)", usable < blocks ? "; scheduler.max_batch_total_tokens (" +
              std::to_string(cfg.max_batch_total_tokens) + ") uses " + std::to_string(usable) + " of them: raise it to batch more" : "");
  if (cfg.kv_blocks > 0) {
    QUILT_REQUIRE(cfg.kv_blocks <= blocks, "scheduler.kv_blocks (", cfg.kv_blocks, ") needs ",
                  (static_cast<size_t>(cfg.kv_blocks) * per_block) >> 20, " MiB of KV cache per GPU but only ",
                  blocks, " blocks fit in cuda.gpu_memory_fraction (", cfg.gpu_memory_fraction,
                  ") after the weights and activations: lower scheduler.kv_blocks or raise cuda.gpu_memory_fraction");
    return cfg.kv_blocks;
  }
  return usable;
}

}  // namespace

void run_worker_role(const ServeConfig& cfg_in, const std::string& model_dir, const JobLayout& layout,
                     Transport& transport, MPI_Comm world) {
  ServeConfig cfg = cfg_in;
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
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), " s");
  AdapterStore adapters(model, *backend,
                        AdapterStoreOptions{cfg.adapter_slots, cfg.adapter_max_rank,
                                            static_cast<size_t>(cfg.adapter_host_cache_mb) << 20});
  if (talk && cfg.adapter_slots > 0)
    log::info("replica ", layout.replica, ": ", cfg.adapter_slots, " adapter slots of rank ", cfg.adapter_max_rank,
              " reserved (", adapters.reserved_bytes() >> 10, " KiB per rank)");
  if (cfg.backend == "cuda") model.set_decode_graphs(cfg.cuda_graphs_max_batch);
  // Before sizing: the KV bytes per block (and the warm-up's scratch cache) follow the KV dtype.
  if (cfg.cuda_kv_cache_dtype == "fp8_e4m3") model.set_kv_cache_dtype(DType::fp8_e4m3);
  int mine = 0;
  try {
    mine = size_kv_blocks(cfg, model, *backend, talk, layout.replica);
  } catch (const std::exception& e) {
    // Reported here, then the agreement fails for everyone with the same message.
    log::error("replica ", layout.replica, ": sizing the KV cache failed: ", e.what());
    mine = 0;
  }
  cfg.kv_blocks = agree_kv_blocks(cfg, mine, world);
  if (talk)
    log::info("replica ", layout.replica, ": ", cfg.kv_blocks, " KV blocks of ", cfg.block_size, " tokens (",
              (static_cast<size_t>(cfg.kv_blocks) * model.kv_bytes_per_block(cfg.block_size)) >> 20, " MiB per rank, ",
              dtype_name(model.kv_cache_dtype()), ")");
  ModelRunner runner(model, cfg.effective_kv_blocks(), cfg.block_size, load_eos_ids(model_dir, mcfg), layout.replica,
                     &adapters);
  WorkerOptions opt;
  opt.replica = layout.replica;
  opt.tp_rank = layout.tp_rank;
  opt.heartbeat_interval_s = cfg.heartbeat_interval_s;
  Worker(runner, transport, opt, &adapters).run();
}

}  // namespace quilt
