#include "launch/serve.h"

#include <climits>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "launch/roles.h"
#include "model/gemma_config.h"
#include "model/tokenizer.h"
#include "runtime/coordinator/coordinator.h"
#include "runtime/core/log.h"
#include "runtime/http/http_server.h"
#include "runtime/transport/mpi_transport.h"

namespace quilt {
namespace fs = std::filesystem;

int run_serve(const ServeOptions& opt, MPI_Comm world) {
  ServeConfig cfg = opt.config_path.empty() ? ServeConfig::from_yaml_text("", "defaults")
                                            : ServeConfig::from_file(opt.config_path);
  if (!opt.model_dir.empty()) cfg.model_path = opt.model_dir;
  if (!opt.host.empty()) cfg.host = opt.host;
  if (opt.port >= 0) cfg.port = opt.port;
  log::set_level(log::parse_level(cfg.log_level));
  int rank = 0;
  MPI_Comm_rank(world, &rank);
  if (opt.print_config) {
    if (rank == 0) std::printf("%s", cfg.to_yaml().c_str());
    return 0;
  }
  const JobLayout layout = split_job(cfg, world);
  MpiTransport transport(world);
  const bool embedded = cfg.model_path.empty();
  const std::string model_dir = resolve_model_dir(cfg);
  // The tiny default model's demo adapters are servable by name unless roots are configured.
  if (embedded && cfg.adapter_roots.empty()) cfg.adapter_roots.push_back(model_dir + "/adapters");

  if (!layout.coordinator) {
    run_worker_role(cfg, model_dir, layout, transport, world);
    return 0;
  }

  if (embedded)
    log::warn("no model.path configured: serving the tiny random Gemma in ", model_dir,
              " (random weights: its text is noise; demo adapters demo-qv-r4 and demo-all-r8). "
              "To serve a real model, set model.path (or --model) to a Hugging Face Gemma folder, e.g. "
              "google/gemma-2b downloaded with its config.json, *.safetensors and tokenizer.model");
  const GemmaConfig mcfg = GemmaConfig::from_file(model_dir + "/config.json");
  auto tok = Tokenizer::load(model_dir);
  const std::vector<int> eos = load_eos_ids(model_dir, mcfg);
  // Waits for the workers to load and size their KV caches (the GPUs' free memory decides).
  log::info("waiting for the workers to load the model and size their KV caches");
  cfg.kv_blocks = agree_kv_blocks(cfg, INT_MAX, world);
  Metrics metrics;
  Metrics::declare_serving_metrics(metrics);
  Coordinator coord(cfg, *tok, transport, eos, metrics);
  ModelInfo info;
  info.model_id = !cfg.model_id.empty() ? cfg.model_id
                  : embedded             ? "quilt-tiny-random"
                                         : fs::path(model_dir).lexically_normal().filename().string();
  if (info.model_id.empty()) info.model_id = fs::path(model_dir).parent_path().filename().string();
  info.dtype = cfg.backend == "cpu" ? "float32" : "bfloat16";
  info.device_type = cfg.backend;
  info.eos_ids = eos;
  HttpServer http(cfg, *tok, coord, metrics, info);
  coord.start();
  http.start();
  log::info("serving '", info.model_id, "' with ", cfg.replicas, " replica(s) x tensor parallel ",
            cfg.tensor_parallel, " (", cfg.backend, "); ", mcfg.summary());
  const std::string url = "http://" + (cfg.host == "0.0.0.0" ? std::string("127.0.0.1") : cfg.host) + ":" +
                          std::to_string(http.port());
  std::fprintf(stderr,
               "\nQuilt is serving on %s (health: %s/health; Ctrl-C stops the job). Try:\n"
               "  curl %s/generate -H 'Content-Type: application/json' \\\n"
               "       -d '{\"inputs\": \"Hello\", \"parameters\": {\"max_new_tokens\": 16}}'\n"
               "  curl %s/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 16}'\n\n",
               url.c_str(), url.c_str(), url.c_str(), url.c_str());

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  sigwait(&set, &sig);
  log::info("signal ", sig, ": stopping (in-flight requests get 503, workers are told to shut down)");
  http.stop();
  coord.shutdown();
  return 0;
}

}  // namespace quilt
