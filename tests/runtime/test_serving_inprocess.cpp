// The whole serving conversation in one process: a coordinator and worker actors connected by
// the in-process transport, each worker with its own copy of a golden model. Greedy requests
// must reproduce Hugging Face's tokens however they are batched, nothing may be lost, and bad or
// cancelled requests must not disturb the others.
#include <gtest/gtest.h>

#include "tests/runtime/serving_harness.h"

using namespace quilt;

using namespace quilt::testing;

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
  adapter_req.adapter = "nope";  // no such adapter in the roots or the hub cache
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
  EXPECT_EQ(with_adapter->error->status, 404);
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
