// LoRA overhead on the CPU backend and adapter load times (issue 4's note).
//   bench_lora_cpu MODEL_DIR ADAPTER_DIR [batch=8] [steps=20]
// Decode steps of `batch` rows at context 64: the base model, every row through one adapter,
// and 8 distinct adapters (copies of ADAPTER_DIR installed in 8 slots); then the time to read the
// adapter from disk, from the host cache, and to install it into a reserved slot.
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "model/gemma_model.h"
#include "runtime/worker/adapter_store.h"
#include "runtime/worker/model_runner.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

static double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_DIR [batch] [steps]\n", argv[0]);
    return 2;
  }
  const std::string model_dir = argv[1], adapter_dir = argv[2];
  const int batch = argc > 3 ? std::atoi(argv[3]) : 8, steps = argc > 4 ? std::atoi(argv[4]) : 20;
  const GemmaConfig cfg = GemmaConfig::from_file(model_dir + "/config.json");
  auto be = make_backend("cpu");
  SoloCommunicator comm;
  GemmaForCausalLM model(cfg, *be, comm, Checkpoint::open(model_dir));
  AdapterStore store(model, *be, AdapterStoreOptions{8, 16, size_t{1} << 30});

  auto t0 = Clock::now();
  auto host = store.read("a", adapter_dir);
  const double disk_ms = ms(Clock::now() - t0);
  t0 = Clock::now();
  auto again = store.read("a", adapter_dir);
  const double cache_ms = ms(Clock::now() - t0);
  t0 = Clock::now();
  store.install(0, *again);
  const double install_ms = ms(Clock::now() - t0);
  for (int s = 1; s < 8; ++s) store.install(s, *host);
  std::printf("adapter: rank %d on all 7 modules, %.1f MiB in fp32 on the host\n", host->max_rank,
              host->host_bytes() / 1048576.0);
  std::printf("load from disk (read + validate + fp32): %.2f ms; from the host cache: %.4f ms; install into a slot: %.2f ms\n",
              disk_ms, cache_ms, install_ms);

  const int ctx = 64;
  KvCache kv = model.allocate_kv_cache(batch * (ctx / 16 + 2), 16);
  auto run = [&](int distinct) {
    ForwardInputs in;
    in.cu_seqlen_prefill.push_back(0);
    in.max_blocks_per_seq = ctx / 16 + 1;
    for (int b = 0; b < batch; ++b) {
      in.input_ids.push_back(5 + b);
      in.position_ids.push_back(ctx - 1);
      const int first = b * (ctx / 16 + 1);
      in.slots.push_back((first + (ctx - 1) / 16) * 16 + (ctx - 1) % 16);
      in.cu_seqlen_prefill.push_back(b + 1);
      in.seqlen.push_back(ctx);
      for (int k = 0; k < in.max_blocks_per_seq; ++k) in.block_tables.push_back(first + k);
      if (distinct > 0) in.adapter_data.segments.push_back({b, b + 1, store.slot(b % distinct)});
    }
    in.max_s = ctx;
    model.forward(in, kv);  // warm-up
    const auto t = Clock::now();
    for (int i = 0; i < steps; ++i) model.forward(in, kv);
    return ms(Clock::now() - t) / steps;
  };
  const double base = run(0), one = run(1), eight = run(8);
  std::printf("decode step, batch %d, context %d (%s): base %.2f ms; 1 adapter %.2f ms (+%.1f%%); 8 distinct adapters %.2f ms (+%.1f%%)\n",
              batch, ctx, cfg.summary().c_str(), base, one, 100 * (one / base - 1), eight, 100 * (eight / base - 1));
  return 0;
}
