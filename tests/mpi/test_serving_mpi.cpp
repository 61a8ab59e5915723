// The serving job over real MPI: rank 0 runs the coordinator, the other ranks run the worker
// role exactly as `quilt serve` wires it. Under -np 3 (2 replicas x TP 1) and -np 5 (2 replicas x
// TP 2). Greedy requests must reproduce the golden tokens; none may be lost.
#include <climits>
#include <gtest/gtest.h>
#include <mpi.h>

#include <condition_variable>
#include <mutex>

#include "launch/roles.h"
#include "model/gemma_config.h"
#include "model/tokenizer.h"
#include "runtime/coordinator/coordinator.h"
#include "runtime/transport/mpi_transport.h"
#include "tests/model/fixtures.h"

using namespace quilt;

namespace {
class Recorder : public RequestSink {
 public:
  void on_token(const TokenEvent& t) override {
    std::lock_guard<std::mutex> lk(mu_);
    ids.push_back(t.id);
  }
  void on_finish(const FinishEvent& f) override {
    std::lock_guard<std::mutex> lk(mu_);
    reason = f.reason;
    done = true;
    cv_.notify_all();
  }
  void on_error(const ApiError& e) override {
    std::lock_guard<std::mutex> lk(mu_);
    error = e.message;
    done = true;
    cv_.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(120), [&] { return done; });
  }
  std::vector<int> ids;
  std::optional<FinishReason> reason;
  std::string error;
  bool done = false;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
};
}  // namespace

TEST(ServingMpi, GoldenGreedyThroughTheJob) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  ASSERT_EQ((world - 1) % 2, 0) << "run with 1 + 2 * tp ranks";
  const auto fixtures = quilt::testing::load_fixtures();
  for (const auto& f : fixtures) {
    ServeConfig cfg;
    cfg.model_path = f.dir;
    cfg.replicas = 2;
    cfg.tensor_parallel = (world - 1) / 2;
    cfg.max_input_length = 200;
    cfg.max_total_tokens = 256;
    cfg.max_batch_prefill_tokens = 512;
    cfg.max_batch_total_tokens = 2048;
    cfg.heartbeat_interval_s = 0.1;
    const JobLayout layout = split_job(cfg, MPI_COMM_WORLD);
    MpiTransport transport(MPI_COMM_WORLD);
    if (!layout.coordinator) {
      run_worker_role(cfg, f.dir, layout, transport, MPI_COMM_WORLD);
      MPI_Comm_free(const_cast<MPI_Comm*>(&layout.replica_comm));
      continue;
    }
    cfg.kv_blocks = agree_kv_blocks(cfg, INT_MAX, MPI_COMM_WORLD);  // as run_serve: after the workers load
    auto tok = Tokenizer::load(f.dir);
    Metrics metrics;
    Metrics::declare_serving_metrics(metrics);
    const GemmaConfig mcfg = GemmaConfig::from_file(f.dir + "/config.json");
    Coordinator coord(cfg, *tok, transport, load_eos_ids(f.dir, mcfg), metrics);
    coord.start();
    std::vector<std::shared_ptr<Recorder>> recs;
    const auto cases = f.base_cases();
    for (int copy = 0; copy < 4; ++copy)
      for (const auto* c : cases) {
        GenerateRequest r;
        r.prompt_ids = c->prompt_ids;
        r.sampling.max_new_tokens = f.max_new_tokens;
        recs.push_back(std::make_shared<Recorder>());
        coord.submit(r, recs.back());
      }
    for (size_t i = 0; i < recs.size(); ++i) {
      ASSERT_TRUE(recs[i]->wait()) << "request " << i << " never ended";
      EXPECT_EQ(recs[i]->error, "");
      EXPECT_EQ(recs[i]->ids, cases[i % cases.size()]->greedy_ids) << f.name << " request " << i;
    }
    for (int i = 0; i < 200 && !coord.status().healthy; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    EXPECT_TRUE(coord.status().healthy);
    EXPECT_EQ(coord.status().workers_up, world - 1);
    coord.shutdown();  // workers leave run_worker_role
  }
}
