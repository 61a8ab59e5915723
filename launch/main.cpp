// The `quilt` executable: MPI_Init, rank -> role, explicit wiring. No globals.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "launch/generate.h"
#include "runtime/core/log.h"

int main(int argc, char** argv) {
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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
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
