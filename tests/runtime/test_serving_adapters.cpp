// Multi-LoRA through the serving job (coordinator + workers, in process): adapters named by
// adapter_id resolve in the roots, load into a few slots per replica (eviction and reload from
// the host cache), give PEFT's tokens, fail alone with 424 when broken, and 200 distinct
// adapters through 8 slots x 2 replicas under concurrent load each give their own output.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "model/greedy.h"
#include "model/safetensors.h"
#include "tests/runtime/serving_harness.h"

using namespace quilt;
using namespace quilt::testing;
namespace fs = std::filesystem;

namespace {
fs::path temp_dir(const std::string& tag) {
  const fs::path p = fs::temp_directory_path() / ("quilt_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// Writes `src`'s adapter with every lora_B scaled by `factor` and every lora_A row r multiplied
// by sign(r), as f32: a distinct adapter of the same shapes.
void write_variant(const fs::path& src, const fs::path& dst, float factor, uint32_t signs) {
  fs::create_directories(dst);
  fs::copy_file(src / "adapter_config.json", dst / "adapter_config.json", fs::copy_options::overwrite_existing);
  auto in = SafetensorsFile::open((src / "adapter_model.safetensors").string());
  nlohmann::json header = nlohmann::json::object();
  std::vector<char> data;
  for (const auto& [name, t] : in->tensors()) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    convert_to_f32(v.data(), t.data, t.dtype, v.size());
    const bool is_b = name.find("lora_B") != std::string::npos;
    const int64_t cols = t.shape[1];
    for (size_t i = 0; i < v.size(); ++i) {
      if (is_b) v[i] *= factor;
      else if ((signs >> ((i / cols) % 32)) & 1u) v[i] = -v[i];
    }
    header[name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + v.size() * 4}}};
    const char* p = reinterpret_cast<const char*>(v.data());
    data.insert(data.end(), p, p + v.size() * 4);
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  std::ofstream out(dst / "adapter_model.safetensors", std::ios::binary);
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}
}  // namespace

TEST(ServingAdapters, GoldenAdaptersByIdThroughFewerSlotsThanAdapters) {
  for (const auto& f : load_fixtures()) {
    auto cfg = small_config(2);
    cfg.adapter_roots = {f.dir + "/adapters"};
    cfg.adapter_slots = 2;  // three adapters: slots must be evicted and reloaded
    Job job(f, cfg);
    std::vector<std::shared_ptr<Recorder>> recs;
    std::vector<const GoldenCase*> which;
    for (int copy = 0; copy < 2; ++copy)
      for (const auto& c : f.cases) {
        auto req = job.greedy(c.prompt_ids, f.max_new_tokens);
        req.adapter = c.adapter.value_or("");
        recs.push_back(std::make_shared<Recorder>());
        which.push_back(&c);
        job.coord->submit(req, recs.back());
      }
    for (size_t i = 0; i < recs.size(); ++i) {
      ASSERT_TRUE(recs[i]->wait()) << "request " << i << " never ended";
      ASSERT_FALSE(recs[i]->error) << recs[i]->error->message;
      EXPECT_EQ(recs[i]->ids(), which[i]->greedy_ids) << f.name << " " << which[i]->adapter.value_or("base");
    }
    const auto st = job.coord->status();
    for (const auto& a : st.adapters) EXPECT_LE(a.slot, 1);
  }
}

TEST(ServingAdapters, BrokenAdapterFailsAloneWith424AndIsRetriedAfterBackoff) {
  const auto fixtures = load_fixtures();
  const auto& f = fixtures.front();
  const fs::path roots = temp_dir("roots");
  fs::copy(fs::path(f.dir) / "adapters", roots, fs::copy_options::recursive);
  fs::copy(roots / "b-r8-all", roots / "broken", fs::copy_options::recursive);
  fs::resize_file(roots / "broken/adapter_model.safetensors", 100);  // truncated
  auto cfg = small_config(1);
  cfg.adapter_roots = {roots.string()};
  cfg.adapter_retry_backoff_s = 0.5;
  Job job(f, cfg);
  const auto& base = *f.base_cases()[1];
  const GoldenCase* with_a = nullptr;
  for (const auto& c : f.cases)
    if (c.adapter && *c.adapter == "a-r4-qv" && c.prompt == base.prompt) with_a = &c;
  ASSERT_NE(with_a, nullptr);
  auto broken = std::make_shared<Recorder>(), good = std::make_shared<Recorder>(), plain = std::make_shared<Recorder>();
  auto req_broken = job.greedy(base.prompt_ids, 5);
  req_broken.adapter = "broken";
  auto req_good = job.greedy(with_a->prompt_ids, f.max_new_tokens);
  req_good.adapter = "a-r4-qv";
  job.coord->submit(req_broken, broken);
  job.coord->submit(req_good, good);
  job.coord->submit(job.greedy(base.prompt_ids, f.max_new_tokens), plain);
  ASSERT_TRUE(broken->wait() && good->wait() && plain->wait());
  ASSERT_TRUE(broken->error);
  EXPECT_EQ(broken->error->status, 424);
  EXPECT_NE(broken->error->message.find("truncated"), std::string::npos) << broken->error->message;
  EXPECT_EQ(good->ids(), with_a->greedy_ids);
  EXPECT_EQ(plain->ids(), base.greedy_ids);
  // within the back-off: refused at once, naming the earlier failure
  auto again = std::make_shared<Recorder>();
  job.coord->submit(req_broken, again);
  ASSERT_TRUE(again->wait());
  ASSERT_TRUE(again->error);
  EXPECT_EQ(again->error->status, 424);
  EXPECT_NE(again->error->message.find("retry_backoff_s"), std::string::npos) << again->error->message;
  // repaired on disk; after the back-off it loads
  fs::remove_all(roots / "broken");
  fs::copy(roots / "b-r8-all", roots / "broken", fs::copy_options::recursive);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  auto fixed = std::make_shared<Recorder>();
  job.coord->submit(req_broken, fixed);
  ASSERT_TRUE(fixed->wait());
  EXPECT_FALSE(fixed->error) << fixed->error->message;
  fs::remove_all(roots);
}

TEST(ServingAdapters, TwoHundredAdaptersThroughEightSlotsTimesTwoReplicas) {
  const auto fixtures = load_fixtures();
  const auto& f = fixtures.back();
  const fs::path roots = temp_dir("many");
  constexpr int kAdapters = 200;
  for (int i = 0; i < kAdapters; ++i)
    write_variant(fs::path(f.dir) / "adapters/b-r8-all", roots / ("ad" + std::to_string(i)),
                  0.4f + 0.02f * static_cast<float>(i % 97), 2654435761u * static_cast<uint32_t>(i + 1));
  const auto& prompt = f.base_cases()[0]->prompt_ids;
  constexpr int kNew = 4;
  // The reference: each adapter alone through greedy_generate (itself checked against PEFT).
  const GemmaConfig mcfg = GemmaConfig::from_file(f.dir + "/config.json");
  auto be = make_backend("cpu");
  SoloCommunicator solo;
  GemmaForCausalLM ref(mcfg, *be, solo, Checkpoint::open(f.dir));
  std::vector<std::vector<int>> want(kAdapters);
  std::set<std::vector<int>> distinct;
  for (int i = 0; i < kAdapters; ++i) {
    const auto shard = ref.load_adapter(HostLoraAdapter::load((roots / ("ad" + std::to_string(i))).string(), "x", mcfg));
    want[i] = greedy_generate(ref, prompt, kNew, mcfg.eos_token_ids, &shard).greedy_ids;
    distinct.insert(want[i]);
  }
  EXPECT_GE(distinct.size(), 10u) << "the generated adapters should differ in output";

  auto cfg = small_config(2);
  cfg.adapter_roots = {roots.string()};
  cfg.adapter_slots = 8;
  cfg.max_active_adapters = 8;
  cfg.adapter_cycle_time_s = 0.05;
  cfg.max_concurrent_requests = 4096;
  Job job(f, cfg);
  // Two waves over all 200 adapters: the second finds most of them evicted and reloads them
  // (from the workers' host cache).
  std::vector<std::shared_ptr<Recorder>> recs(kAdapters * 2);
  int wrong = 0;
  for (int wave = 0; wave < 2; ++wave) {
    std::vector<std::thread> clients;
    for (int t = 0; t < 4; ++t)
      clients.emplace_back([&, t, wave] {
        for (int k = wave * kAdapters + t; k < (wave + 1) * kAdapters; k += 4) {
          auto req = job.greedy(prompt, kNew);
          req.adapter = "ad" + std::to_string(k % kAdapters);
          recs[k] = std::make_shared<Recorder>();
          job.coord->submit(req, recs[k]);
        }
      });
    for (auto& c : clients) c.join();
    for (int k = wave * kAdapters; k < (wave + 1) * kAdapters; ++k) {
      ASSERT_TRUE(recs[k]->wait(std::chrono::seconds(300))) << "request " << k << " was lost";
      ASSERT_FALSE(recs[k]->error) << recs[k]->error->message;
      wrong += recs[k]->ids() != want[k % kAdapters];
    }
  }
  EXPECT_EQ(wrong, 0) << wrong << " requests did not get their own adapter's output";
  // 200 adapters through 16 slots: loads and evictions happened and are counted in /metrics
  const double loads = job.metrics.value("quilt_adapter_loads_total", {{"replica", "0"}}) +
                       job.metrics.value("quilt_adapter_loads_total", {{"replica", "1"}});
  const double evictions = job.metrics.value("quilt_adapter_evictions_total", {{"replica", "0"}}) +
                           job.metrics.value("quilt_adapter_evictions_total", {{"replica", "1"}});
  EXPECT_GE(loads, 2 * kAdapters - 16);  // the second wave reloads what the first evicted
  EXPECT_GE(evictions, kAdapters - 16);
  const std::string text = job.metrics.render();
  EXPECT_NE(text.find("quilt_adapter_evictions_total{replica=\"0\"}"), std::string::npos);
  std::printf("[adapters] %d requests over %d adapters: %.0f loads, %.0f evictions\n", kAdapters * 2, kAdapters, loads,
              evictions);
  const auto st = job.coord->status();
  EXPECT_LE(st.adapters.size(), 16u);
  for (int i = 0; i < 100 && job.coord->status().kv_blocks_used != std::vector<int>{0, 0}; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(job.coord->status().kv_blocks_used, (std::vector<int>{0, 0}));
  fs::remove_all(roots);
}
