#include "launch/generate.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "model/gemma_model.h"
#include "model/greedy.h"
#include "model/tokenizer.h"
#include "runtime/comm/make_communicator.h"
#include "runtime/core/log.h"

namespace quilt {
namespace fs = std::filesystem;

namespace {
// Progress for long loads: a line at every 10% and at the end, from tp rank 0 only.
LoadProgress progress_logger(int rank) {
  auto start = std::chrono::steady_clock::now();
  auto next = std::make_shared<int>(10);
  return [rank, start, next](size_t done, size_t total) {
    if (rank != 0 || total < (size_t{256} << 20)) return;  // small checkpoints load in a blink
    const int pct = static_cast<int>(100.0 * done / total);
    if (pct < *next && done != total) return;
    while (*next <= pct) *next += 10;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    log::info("loading weights: ", pct, "% (", done / (1 << 20), " / ", total / (1 << 20), " MiB, ",
              static_cast<int>(s * 10) / 10.0, " s)");
  };
}
}  // namespace

int run_generate(const GenerateOptions& opt, MPI_Comm comm) {
  int rank = 0, world = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  const GemmaConfig cfg = GemmaConfig::from_file((fs::path(opt.model_dir) / "config.json").string());
  if (rank == 0) log::info(cfg.summary(), ", tensor parallel ", world);

  std::unique_ptr<Tokenizer> tok;
  std::vector<int> ids;
  if (rank == 0) {
    tok = Tokenizer::load(opt.model_dir);
    ids = tok->encode(opt.prompt);
    QUILT_REQUIRE(tok->vocab_size() <= cfg.vocab_size, "tokenizer has ", tok->vocab_size(),
                  " pieces but the model's vocab_size is ", cfg.vocab_size);
  }
  int n = static_cast<int>(ids.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, comm);
  ids.resize(n);
  MPI_Bcast(ids.data(), n, MPI_INT, 0, comm);

  // One GPU per rank (all ranks of `quilt generate` are on the node they were started on).
  MPI_Comm node = MPI_COMM_NULL;
  int local = 0;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  BackendOptions bo;
  bo.device = local;
  auto backend = make_backend(opt.backend, bo);
  auto tp_ptr = make_communicator(*backend, comm);
  Communicator& tp = *tp_ptr;
  const Checkpoint ckpt = Checkpoint::open(opt.model_dir);
  const auto t0 = std::chrono::steady_clock::now();
  GemmaForCausalLM model(cfg, *backend, tp, ckpt, progress_logger(rank));
  const auto t1 = std::chrono::steady_clock::now();
  if (rank == 0)
    log::info("loaded ", ckpt.total_bytes() / (1 << 20), " MiB from ", ckpt.num_files(), " file(s) in ",
              std::chrono::duration<double>(t1 - t0).count(), " s");

  std::optional<LoraAdapterShard> adapter;
  if (!opt.adapter_dir.empty()) {
    const HostLoraAdapter host = HostLoraAdapter::load(opt.adapter_dir, fs::path(opt.adapter_dir).filename().string(), cfg);
    adapter = model.load_adapter(host);
    if (rank == 0)
      log::info("adapter '", host.name, "': max rank ", host.max_rank, ", ", host.host_bytes() >> 10, " KiB");
  }
  const GreedyResult r = greedy_generate(model, ids, opt.max_new_tokens, load_eos_ids(opt.model_dir, cfg),
                                         adapter ? &*adapter : nullptr);
  const auto t2 = std::chrono::steady_clock::now();
  if (rank != 0) return 0;
  log::info("generated ", r.greedy_ids.size(), " tokens in ",
            std::chrono::duration<double>(t2 - t1).count(), " s: prefill of ", r.prompt_ids.size(),
            " tokens ", r.prefill_seconds * 1e3, " ms, decode ",
            r.decode_steps ? r.decode_seconds * 1e3 / r.decode_steps : 0.0, " ms/step over ",
            r.decode_steps, " steps (backend ", opt.backend, ", tp ", tp.size(), ")");

  std::vector<int> shown;
  const std::vector<int> eos = load_eos_ids(opt.model_dir, cfg);
  for (int id : r.greedy_ids)
    if (std::find(eos.begin(), eos.end(), id) == eos.end()) shown.push_back(id);
  const std::string text = tok->decode(shown);
  if (opt.json) {
    nlohmann::json j;
    j["prompt_ids"] = r.prompt_ids;
    nlohmann::json lp = nlohmann::json::array();
    for (const auto& v : r.prompt_logprobs) lp.push_back(v ? nlohmann::json(*v) : nlohmann::json(nullptr));
    j["prompt_logprobs"] = lp;
    j["greedy_ids"] = r.greedy_ids;
    j["greedy_logprobs"] = r.greedy_logprobs;
    j["text"] = text;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s\n", text.c_str());
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace quilt
