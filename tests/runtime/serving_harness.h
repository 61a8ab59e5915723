#pragma once
// A serving job in one process for tests: a coordinator and one worker actor per replica
// (TP 1, each with its own copy of a golden model and adapter slots) over the in-process
// transport, and a RequestSink that records what it is told.
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "runtime/coordinator/coordinator.h"
#include "runtime/worker/worker.h"
#include "tests/model/fixtures.h"

namespace quilt::testing {

class Recorder : public RequestSink {
 public:
  void on_token(const TokenEvent& t) override {
    std::lock_guard<std::mutex> lk(mu_);
    tokens.push_back(t);
  }
  void on_finish(const FinishEvent& f) override {
    std::lock_guard<std::mutex> lk(mu_);
    finish = f;
    ++ends;
    cv_.notify_all();
  }
  void on_error(const ApiError& e) override {
    std::lock_guard<std::mutex> lk(mu_);
    error = e;
    ++ends;
    cv_.notify_all();
  }
  bool wait(std::chrono::seconds limit = std::chrono::seconds(60)) {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, limit, [&] { return ends > 0; });
  }
  bool tokens_empty() {
    std::lock_guard<std::mutex> lk(mu_);
    return tokens.empty();
  }
  std::vector<int> ids() const {
    std::vector<int> out;
    for (const auto& t : tokens) out.push_back(t.id);
    return out;
  }
  std::vector<TokenEvent> tokens;
  std::optional<FinishEvent> finish;
  std::optional<ApiError> error;
  int ends = 0;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};

struct Job {
  ServeConfig cfg;
  InProcessNetwork net;
  Metrics metrics;
  std::unique_ptr<Tokenizer> tok;
  struct WorkerParts {
    std::unique_ptr<Backend> be;
    SoloCommunicator comm;
    std::unique_ptr<GemmaForCausalLM> model;
    std::unique_ptr<AdapterStore> adapters;
    std::unique_ptr<ModelRunner> runner;
    std::unique_ptr<Worker> worker;
    std::thread thread;
  };
  std::vector<std::unique_ptr<WorkerParts>> workers;
  std::unique_ptr<Coordinator> coord;
  GemmaConfig mcfg;

  // start_workers = false: the coordinator alone, its workers never report (for 503 tests).
  Job(const quilt::testing::Fixture& f, ServeConfig c, bool start_workers = true)
      : cfg(c), net(c.world_size()), mcfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    Metrics::declare_serving_metrics(metrics);
    tok = Tokenizer::load(f.dir);
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    for (int r = 0; start_workers && r < cfg.replicas; ++r) {
      auto w = std::make_unique<WorkerParts>();
      w->be = make_backend("cpu");
      w->model = std::make_unique<GemmaForCausalLM>(mcfg, *w->be, w->comm, ckpt);
      w->adapters = std::make_unique<AdapterStore>(
          *w->model, *w->be, AdapterStoreOptions{cfg.adapter_slots, cfg.adapter_max_rank, size_t{64} << 20});
      w->runner = std::make_unique<ModelRunner>(*w->model, cfg.effective_kv_blocks(), cfg.block_size, mcfg.eos_token_ids, r,
                                                w->adapters.get());
      WorkerOptions opt;
      opt.replica = r;
      opt.heartbeat_interval_s = 0.05;
      w->worker = std::make_unique<Worker>(*w->runner, net.endpoint(1 + r), opt, w->adapters.get());
      workers.push_back(std::move(w));
    }
    for (auto& w : workers) w->thread = std::thread([p = w.get()] { p->worker->run(); });
    coord = std::make_unique<Coordinator>(cfg, *tok, net.endpoint(0), mcfg.eos_token_ids, metrics);
    coord->start();
  }
  ~Job() {
    coord->shutdown();
    for (auto& w : workers) w->thread.join();
  }
  GenerateRequest greedy(const std::vector<int>& ids, int max_new) const {
    GenerateRequest r;
    r.prompt_ids = ids;
    r.sampling.max_new_tokens = max_new;
    return r;
  }
};

inline ServeConfig small_config(int replicas) {
  ServeConfig c;
  c.adapter_slots = 2;
  c.adapter_max_rank = 8;
  c.adapter_hub_cache = "/nonexistent-hub-cache";
  c.replicas = replicas;
  c.max_input_length = 200;
  c.max_total_tokens = 256;
  c.max_batch_prefill_tokens = 512;
  c.max_batch_total_tokens = 2048;
  c.heartbeat_interval_s = 0.05;
  c.heartbeat_timeout_s = 5;
  return c;
}


}  // namespace quilt::testing
