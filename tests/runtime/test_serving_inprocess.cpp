// The whole serving conversation in one process: a coordinator and worker actors connected by
// the in-process transport, each worker with its own copy of a golden model. Greedy requests
// must reproduce Hugging Face's tokens however they are batched, nothing may be lost, and bad or
// cancelled requests must not disturb the others.
#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "runtime/coordinator/coordinator.h"
#include "runtime/worker/worker.h"
#include "tests/model/fixtures.h"

using namespace quilt;

namespace {

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
    std::unique_ptr<ModelRunner> runner;
    std::unique_ptr<Worker> worker;
    std::thread thread;
  };
  std::vector<std::unique_ptr<WorkerParts>> workers;
  std::unique_ptr<Coordinator> coord;
  GemmaConfig mcfg;

  Job(const quilt::testing::Fixture& f, ServeConfig c)
      : cfg(c), net(c.world_size()), mcfg(GemmaConfig::from_file(f.dir + "/config.json")) {
    Metrics::declare_serving_metrics(metrics);
    tok = Tokenizer::load(f.dir);
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    for (int r = 0; r < cfg.replicas; ++r) {
      auto w = std::make_unique<WorkerParts>();
      w->be = make_backend("cpu");
      w->model = std::make_unique<GemmaForCausalLM>(mcfg, *w->be, w->comm, ckpt);
      w->runner = std::make_unique<ModelRunner>(*w->model, cfg.effective_kv_blocks(), cfg.block_size, mcfg.eos_token_ids, r);
      WorkerOptions opt;
      opt.replica = r;
      opt.heartbeat_interval_s = 0.05;
      w->worker = std::make_unique<Worker>(*w->runner, net.endpoint(1 + r), opt);
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

ServeConfig small_config(int replicas) {
  ServeConfig c;
  c.replicas = replicas;
  c.max_input_length = 200;
  c.max_total_tokens = 256;
  c.max_batch_prefill_tokens = 512;
  c.max_batch_total_tokens = 2048;
  c.heartbeat_interval_s = 0.05;
  c.heartbeat_timeout_s = 5;
  return c;
}

}  // namespace

TEST(ServingInProcess, GreedyRequestsMatchGoldenAcrossTwoReplicas) {
  const auto fixtures = quilt::testing::load_fixtures();
  for (const auto& f : fixtures) {
    Job job(f, small_config(2));
    std::vector<std::shared_ptr<Recorder>> recs;
    const auto cases = f.base_cases();
    for (int copy = 0; copy < 3; ++copy)
      for (const auto* c : cases) {
        recs.push_back(std::make_shared<Recorder>());
        job.coord->submit(job.greedy(c->prompt_ids, f.max_new_tokens), recs.back());
      }
    for (size_t i = 0; i < recs.size(); ++i) {
      ASSERT_TRUE(recs[i]->wait()) << "request " << i << " never ended";
      ASSERT_FALSE(recs[i]->error) << recs[i]->error->message;
      const auto* c = cases[i % cases.size()];
      EXPECT_EQ(recs[i]->ids(), c->greedy_ids) << f.name << " request " << i;
      const bool ends_in_eos = !c->greedy_ids.empty() && c->greedy_ids.back() == 1 &&
                               static_cast<int>(c->greedy_ids.size()) <= f.max_new_tokens;
      EXPECT_EQ(recs[i]->finish->reason, ends_in_eos ? FinishReason::eos_token : FinishReason::length);
      EXPECT_EQ(recs[i]->finish->generated_tokens, static_cast<int>(c->greedy_ids.size()));
      std::vector<int> shown;
      for (int id : c->greedy_ids)
        if (id != 1) shown.push_back(id);
      EXPECT_EQ(recs[i]->finish->generated_text, job.tok->decode(shown));
    }
    for (int i = 0; i < 100 && !job.coord->status().healthy; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const auto st = job.coord->status();
    EXPECT_TRUE(st.healthy);
    EXPECT_EQ(st.workers_up, 2);
    EXPECT_EQ(job.metrics.value("quilt_requests_total", {{"route", "generate"}}), static_cast<double>(recs.size()));
  }
}

TEST(ServingInProcess, ManyConcurrentRequestsNoneLost) {
  const auto fixtures = quilt::testing::load_fixtures();
  const auto& f = fixtures.back();
  auto cfg = small_config(2);
  cfg.max_batch_total_tokens = 600;  // forces queueing: ~3 requests of 200 tokens fit per replica
  cfg.max_total_tokens = 256;
  Job job(f, cfg);
  std::vector<std::shared_ptr<Recorder>> recs;
  std::vector<std::thread> clients;
  std::mutex mu;
  for (int t = 0; t < 4; ++t)
    clients.emplace_back([&, t] {
      for (int i = 0; i < 15; ++i) {
        auto r = std::make_shared<Recorder>();
        std::vector<int> ids{2};
        for (int k = 0; k < 5 + (t * 15 + i) % 40; ++k) ids.push_back(10 + (k * 7 + i) % 400);
        auto req = job.greedy(ids, 1 + i % 12);
        {
          std::lock_guard<std::mutex> lk(mu);
          recs.push_back(r);
        }
        job.coord->submit(req, r);
      }
    });
  for (auto& c : clients) c.join();
  for (auto& r : recs) {
    ASSERT_TRUE(r->wait()) << "a request was lost";
    ASSERT_FALSE(r->error) << r->error->message;
    EXPECT_GE(r->finish->generated_tokens, 1);
  }
  // every block is back once everything finished
  for (int i = 0; i < 100 && job.coord->status().kv_blocks_used != std::vector<int>{0, 0}; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(job.coord->status().kv_blocks_used, (std::vector<int>{0, 0}));
}

TEST(ServingInProcess, BadAndCancelledRequestsDoNotDisturbOthers) {
  const auto fixtures = quilt::testing::load_fixtures();
  const auto& f = fixtures.front();
  const auto cases = f.base_cases();
  auto cfg = small_config(1);
  cfg.max_batch_total_tokens = 4096;
  Job job(f, cfg);
  auto good = std::make_shared<Recorder>();
  auto too_big = std::make_shared<Recorder>();
  auto cancelled = std::make_shared<Recorder>();
  auto with_adapter = std::make_shared<Recorder>();
  auto long_req = job.greedy(cases[2]->prompt_ids, 3000);
  long_req.ignore_eos_token = true;
  const uint64_t cid = job.coord->submit(long_req, cancelled);
  job.coord->submit(job.greedy(cases[1]->prompt_ids, f.max_new_tokens), good);
  job.coord->submit(job.greedy(std::vector<int>(300, 5), 4000), too_big);  // over max_batch_total_tokens
  auto adapter_req = job.greedy(cases[0]->prompt_ids, 5);
  adapter_req.adapter = "nope";
  job.coord->submit(adapter_req, with_adapter);
  // cancel once the long request is streaming
  for (int i = 0; i < 500; ++i) {
    if (!cancelled->tokens_empty()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  job.coord->cancel(cid);
  ASSERT_TRUE(good->wait());
  EXPECT_EQ(good->ids(), cases[1]->greedy_ids);
  ASSERT_TRUE(too_big->wait());
  ASSERT_TRUE(too_big->error);
  EXPECT_EQ(too_big->error->status, 422);
  ASSERT_TRUE(with_adapter->wait());
  EXPECT_EQ(with_adapter->error->status, 400);
  EXPECT_FALSE(cancelled->wait(std::chrono::seconds(1)));  // a cancelled request gets no end event
  for (int i = 0; i < 100 && job.coord->status().kv_blocks_used[0] != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(job.coord->status().kv_blocks_used[0], 0);  // its blocks are free again
}

TEST(ServingInProcess, StopSequenceEndsTheRequest) {
  const auto fixtures = quilt::testing::load_fixtures();
  const auto& f = fixtures.front();
  const auto* c = f.base_cases()[1];
  Job job(f, small_config(1));
  // the golden continuation's text; stop on a piece of it in the middle
  std::vector<int> shown;
  for (int id : c->greedy_ids)
    if (id != 1) shown.push_back(id);
  const std::string full = job.tok->decode(shown);
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(full.size() / 2, 2);
  auto r = std::make_shared<Recorder>();
  auto req = job.greedy(c->prompt_ids, f.max_new_tokens);
  req.stop = {stop};
  job.coord->submit(req, r);
  ASSERT_TRUE(r->wait());
  ASSERT_TRUE(r->finish);
  EXPECT_EQ(r->finish->reason, FinishReason::stop_sequence);
  const auto& text = r->finish->generated_text;
  EXPECT_EQ(text, full.substr(0, full.find(stop) + stop.size()));
  EXPECT_LE(r->finish->generated_tokens, static_cast<int>(c->greedy_ids.size()));
}
