#pragma once
#include <mpi.h>

#include <string>

namespace quilt {

struct GenerateOptions {
  std::string model_dir;
  std::string prompt;
  int max_new_tokens = 32;
  bool json = false;
  std::string backend = "cpu";
  std::string adapter_dir;  // a PEFT LoRA adapter folder; empty = the base model
};

// `quilt generate`: the ranks of `comm` form one tensor-parallel group; rank 0 tokenizes and
// prints. Returns the process exit code.
int run_generate(const GenerateOptions& opt, MPI_Comm comm);

}  // namespace quilt
