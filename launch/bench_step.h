#pragma once
// `quilt bench-step`: the model's step (GemmaForCausalLM::forward, as the worker runs it) on random
// weights of a real Gemma shape, each figure printed as measured | bound | ratio with the device.
#include <mpi.h>

#include <string>
#include <vector>

namespace quilt {

struct BenchStepOptions {
  std::string preset = "gemma-2b";  // gemma-2b | gemma-7b | tiny (a small shape for CPU checks)
  std::string backend = "cuda";
  std::vector<int> batches{1, 8, 32, 128, 256};
  std::vector<int> contexts{512, 2048};
  std::vector<int> prefills{512, 1024, 2048, 4096, 8192};
  std::vector<int> lora_adapters{1, 8, 32};  // distinct adapters in the LoRA batch
  int lora_rank = 16;
  int lora_batch = 64;
  int lora_context = 512;
  int steps = 20;              // timed decode steps per figure (median)
  std::string graphs = "both";  // on | off | both (decode figures)
  std::string kv_dtype = "auto";  // KV cache storage: auto (the compute dtype) | fp8_e4m3 (cuda)
  double hbm_tbs = 0;          // memory bandwidth for the bound; 0: from the GPU's name
  double peak_tflops = 0;      // dense bf16 peak for the prefill bound; 0: from the GPU's name
  std::string json_path;       // also write every figure here (JSON lines)
  std::vector<std::string> only;  // sections to run: decode, prefill, lora, allreduce (empty: all)
};

// Under mpirun -np P the P ranks form one tensor-parallel group (one GPU each); rank 0 prints.
int run_bench_step(const BenchStepOptions& options, MPI_Comm world);

}  // namespace quilt
