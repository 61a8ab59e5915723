// The `quilt` executable: MPI_Init, rank -> role, explicit wiring. No globals.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include <malloc.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <thread>

#include "launch/bench_step.h"
#include "launch/generate.h"
#include "launch/init_model.h"
#include "runtime/config/serve_config.h"
#include "launch/serve.h"
#include "runtime/core/log.h"

int main(int argc, char** argv) {
  // Logits of a large batch (64 rows x 256k vocabulary x 4 bytes = 65 MB) would otherwise be a
  // fresh mmap every step, page-faulted and zeroed again (measured: ~50 ms per step on an H100
  // host at batch 64). Keep big blocks in the heap, and the heap's top, for reuse.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  CLI::App app{"Quilt: a multi-LoRA serving runtime for Gemma"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "debug, info, warn or error")->capture_default_str();

  quilt::GenerateOptions gen;
  auto* g = app.add_subcommand("generate", "Greedy offline generation, for checking and debugging. "
                                           "Under mpirun -np T the T ranks form one tensor-parallel group.");
  g->add_option("--model", gen.model_dir, "Hugging Face checkpoint folder (config.json, safetensors, tokenizer.model)")
      ->required()->check(CLI::ExistingDirectory);
  g->add_option("--prompt", gen.prompt, "Prompt text")->required();
  g->add_option("--max-new-tokens", gen.max_new_tokens, "Tokens to generate (stops earlier at EOS)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  g->add_flag("--json", gen.json, "Print one JSON object: prompt_ids, prompt_logprobs, greedy_ids, greedy_logprobs, text");
  g->add_option("--backend", gen.backend, "cpu or cuda")->capture_default_str();
  g->add_option("--adapter", gen.adapter_dir, "PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)")
      ->check(CLI::ExistingDirectory);

  quilt::ServeOptions serve;
  auto* sv = app.add_subcommand("serve", "Run the serving job: under mpirun -np 1 + replicas x tensor_parallel, rank 0 "
                                         "serves the LoRAX and OpenAI HTTP APIs, the other ranks are workers.");
  sv->add_option("--config", serve.config_path, "YAML config (configs/README.md lists every key); default: all defaults")
      ->check(CLI::ExistingFile);
  sv->add_option("--model", serve.model_dir, "Checkpoint folder, overriding model.path (default: the embedded tiny model)")
      ->check(CLI::ExistingDirectory);
  sv->add_option("--host", serve.host, "Listen address, overriding http.host");
  sv->add_option("--port", serve.port, "Listen port, overriding http.port (0: any free port)")->check(CLI::Range(0, 65535));
  sv->add_flag("--print-config", serve.print_config, "Print the effective configuration and exit");

  std::string init_dir;
  uint64_t init_seed = 0;
  auto* im = app.add_subcommand("init-model", "Write a tiny random Gemma checkpoint (Hugging Face layout, sentencepiece "
                                              "tokenizer, two demo PEFT adapters under adapters/), deterministic by seed");
  im->add_option("dir", init_dir, "Folder to write")->required();
  im->add_option("--seed", init_seed, "Random seed")->capture_default_str();

  std::string launch_config;
  bool launch_dry = false;
  std::vector<std::string> mpirun_args;
  auto* ln = app.add_subcommand("launch", "Start the serving job of a config: computes the world size "
                                          "(1 + replicas x tensor_parallel) and execs mpirun with it");
  ln->add_option("config", launch_config, "YAML config")->required()->check(CLI::ExistingFile);
  ln->add_flag("--dry-run", launch_dry, "Print the mpirun command instead of running it");
  ln->add_option("--mpirun-arg", mpirun_args, "An extra argument for mpirun (repeatable), e.g. --mpirun-arg=--hostfile "
                                               "--mpirun-arg=hosts.txt for several nodes");

  quilt::BenchStepOptions bench;
  auto* bs = app.add_subcommand("bench-step", "Time the model's step on random weights of a real Gemma shape: decode, "
                                               "prefill, LoRA overhead, all-reduce; each figure with its bound. Under "
                                               "mpirun -np P the ranks form one tensor-parallel group (one GPU each).");
  bs->add_option("--preset", bench.preset, "gemma-2b, gemma-7b or tiny")->capture_default_str();
  bs->add_option("--backend", bench.backend, "cuda or cpu")->capture_default_str();
  bs->add_option("--batch", bench.batches, "Decode batch sizes")->delimiter(',')->capture_default_str();
  bs->add_option("--context", bench.contexts, "Decode context lengths")->delimiter(',')->capture_default_str();
  bs->add_option("--prefill", bench.prefills, "Prompt lengths for the prefill figures")->delimiter(',')->capture_default_str();
  bs->add_option("--lora-adapters", bench.lora_adapters, "Distinct adapters in the LoRA batch")->delimiter(',')->capture_default_str();
  bs->add_option("--lora-rank", bench.lora_rank, "LoRA rank (all 7 modules)")->capture_default_str()->check(CLI::PositiveNumber);
  bs->add_option("--lora-batch", bench.lora_batch, "Decode batch of the LoRA figures")->capture_default_str()->check(CLI::PositiveNumber);
  bs->add_option("--lora-context", bench.lora_context, "Context of the LoRA figures")->capture_default_str()->check(CLI::PositiveNumber);
  bs->add_option("--steps", bench.steps, "Timed decode steps per figure (median)")->capture_default_str()->check(CLI::PositiveNumber);
  bs->add_option("--graphs", bench.graphs, "Decode with CUDA graphs: on, off or both")->capture_default_str()
      ->check(CLI::IsMember({"on", "off", "both"}));
  bs->add_option("--kv-dtype", bench.kv_dtype, "KV cache storage: auto (the compute dtype) or fp8_e4m3 (cuda backend)")
      ->capture_default_str()->check(CLI::IsMember({"auto", "fp8_e4m3"}));
  bs->add_option("--hbm-tbs", bench.hbm_tbs, "Memory bandwidth in TB/s for the bounds (default: from the GPU's name)");
  bs->add_option("--peak-tflops", bench.peak_tflops, "Dense bf16 TFLOP/s for the prefill bound (default: from the GPU's name)");
  bs->add_option("--json", bench.json_path, "Append every figure to this file as JSON lines");
  bs->add_option("--only", bench.only, "Sections to run: decode, prefill, lora, allreduce (default: all)")
      ->delimiter(',')->check(CLI::IsMember({"decode", "prefill", "lora", "allreduce"}));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  if (im->parsed()) {
    try {
      quilt::write_tiny_model(init_dir, init_seed);
      std::printf("wrote a tiny random Gemma (seed %llu) to %s: config.json, model.safetensors, tokenizer.model, "
                  "adapters/demo-qv-r4, adapters/demo-all-r8\n", static_cast<unsigned long long>(init_seed), init_dir.c_str());
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "quilt: error: %s\n", e.what());
      return 1;
    }
  }
  if (ln->parsed()) {
    try {
      const auto cfg = quilt::ServeConfig::from_file(launch_config);
      const int np = cfg.world_size();
      std::vector<std::string> cmd = {"mpirun"};
      if (::geteuid() == 0) cmd.push_back("--allow-run-as-root");
      if (np > static_cast<int>(std::thread::hardware_concurrency())) cmd.push_back("--oversubscribe");
      cmd.insert(cmd.end(), mpirun_args.begin(), mpirun_args.end());
      cmd.insert(cmd.end(), {"-np", std::to_string(np), std::filesystem::read_symlink("/proc/self/exe").string(), "serve",
                             "--config", launch_config});
      std::string shown;
      for (const auto& c : cmd) shown += (shown.empty() ? "" : " ") + c;
      std::fprintf(stderr, "quilt launch: %s\n", shown.c_str());
      if (launch_dry) return 0;
      std::vector<char*> cargs;
      for (auto& c : cmd) cargs.push_back(c.data());
      cargs.push_back(nullptr);
      ::execvp("mpirun", cargs.data());
      std::fprintf(stderr, "quilt: error: cannot run mpirun (is Open MPI installed? launch/install-deps.sh installs it)\n");
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "quilt: error: %s\n", e.what());
      return 1;
    }
  }
  if (sv->parsed()) {
    // Rank 0 takes SIGINT/SIGTERM with sigwait to shut the job down in order; block them in every
    // thread, MPI's included, before any is started.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }
  // The transport thread and the compute thread (CPU all-reduce) both call MPI.
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  quilt::log::set_rank(rank, world);
  int rc = 0;
  try {
    QUILT_REQUIRE(provided >= MPI_THREAD_MULTIPLE,
                  "this MPI library does not provide MPI_THREAD_MULTIPLE, which Quilt needs");
    quilt::log::set_level(quilt::log::parse_level(log_level));
    if (g->parsed()) rc = quilt::run_generate(gen, MPI_COMM_WORLD);
    if (sv->parsed()) rc = quilt::run_serve(serve, MPI_COMM_WORLD);
    if (bs->parsed()) rc = quilt::run_bench_step(bench, MPI_COMM_WORLD);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quilt: error%s: %s\n",
                 world > 1 ? (" on rank " + std::to_string(rank)).c_str() : "", e.what());
    std::fflush(stderr);
    // Other ranks may be waiting in a collective: end the whole job rather than hang.
    if (world > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
