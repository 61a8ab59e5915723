// Worker-side adapter slots (reserved memory, zero-padded ranks, host cache) through the plan
// runner against the PEFT goldens, and adapter-id resolution against roots and a hub cache.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "runtime/coordinator/adapter_source.h"
#include "runtime/core/check.h"
#include "runtime/worker/adapter_store.h"
#include "runtime/worker/model_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;
namespace fs = std::filesystem;
namespace msg = quilt::messages;

TEST(AdapterStore, SlotsServeEveryAdapterInOneMixedPlan) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
    auto be = make_backend("cpu");
    SoloCommunicator comm;
    GemmaForCausalLM model(cfg, *be, comm, Checkpoint::open(f.dir));
    AdapterStore store(model, *be, AdapterStoreOptions{4, 16, 1 << 20});
    EXPECT_GT(store.reserved_bytes(), 0u);
    std::map<std::string, int> slot_of;
    int next = 0;
    for (const auto& c : f.cases)
      if (c.adapter && !slot_of.count(*c.adapter)) {
        slot_of[*c.adapter] = next;
        store.install(next++, *store.read(*c.adapter, f.dir + "/adapters/" + *c.adapter));
      }
    ModelRunner runner(model, 256, 16, cfg.eos_token_ids, 0, &store);
    // one plan with every case (base and adapters), then decode steps together
    msg::StepPlan p;
    p.step_id = 1;
    std::map<uint64_t, std::vector<int32_t>> tables;
    int block = 0;
    for (size_t k = 0; k < f.cases.size(); ++k) {
      const auto& c = f.cases[k];
      msg::ScheduledSequence s;
      s.request_id = k;
      s.input_tokens.assign(c.prompt_ids.begin(), c.prompt_ids.end());
      s.num_new_tokens = static_cast<int32_t>(c.prompt_ids.size());
      for (int b = 0; b * 16 < s.num_new_tokens + f.max_new_tokens; ++b) tables[k].push_back(block++);
      s.block_table = tables[k];
      s.adapter_slot = c.adapter ? slot_of[*c.adapter] : msg::kBaseAdapterSlot;
      s.sampling = msg::SamplingParams{};
      p.sequences.push_back(s);
    }
    std::map<uint64_t, std::vector<int>> got;
    std::map<uint64_t, int> ctx;
    auto r = runner.run(p);
    ASSERT_EQ(r.error, "");
    for (const auto& o : r.sequences) got[o.request_id].push_back(o.token->id);
    for (size_t k = 0; k < f.cases.size(); ++k) ctx[k] = static_cast<int>(f.cases[k].prompt_ids.size());
    for (int step = 1; step < f.max_new_tokens; ++step) {
      msg::StepPlan d;
      d.step_id = step + 1;
      for (size_t k = 0; k < f.cases.size(); ++k) {
        if (got[k].size() >= f.cases[k].greedy_ids.size()) continue;
        msg::ScheduledSequence s;
        s.request_id = k;
        s.kind = msg::RowKind::kDecode;
        s.start_pos = ctx[k]++;
        s.num_new_tokens = 1;
        s.block_table = tables[k];
        s.adapter_slot = f.cases[k].adapter ? slot_of[*f.cases[k].adapter] : msg::kBaseAdapterSlot;
        d.sequences.push_back(s);
      }
      if (d.sequences.empty()) break;
      auto rr = runner.run(d);
      ASSERT_EQ(rr.error, "");
      for (const auto& o : rr.sequences) got[o.request_id].push_back(o.token->id);
    }
    for (size_t k = 0; k < f.cases.size(); ++k)
      EXPECT_EQ(got[k], f.cases[k].greedy_ids) << f.name << " " << f.cases[k].adapter.value_or("base");
    // a row naming an empty slot is refused, not run on garbage
    store.evict(0);
    msg::StepPlan bad;
    bad.step_id = 99;
    msg::ScheduledSequence s;
    s.request_id = 1000;
    s.input_tokens = {2, 5};
    s.num_new_tokens = 2;
    s.block_table = {block};
    s.adapter_slot = 0;
    s.sampling = msg::SamplingParams{};
    bad.sequences.push_back(s);
    EXPECT_NE(runner.run(bad).error.find("holds no adapter"), std::string::npos);
  }
}

TEST(AdapterStore, HostCacheServesReloadsWithoutDiskAndRefusesTooHighRank) {
  const auto fixtures = quilt::testing::load_fixtures();
  const auto& f = fixtures.front();
  const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
  auto be = make_backend("cpu");
  SoloCommunicator comm;
  GemmaForCausalLM model(cfg, *be, comm, Checkpoint::open(f.dir));
  const fs::path tmp = fs::temp_directory_path() / ("quilt_store_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::copy(fs::path(f.dir) / "adapters", tmp, fs::copy_options::recursive);
  AdapterStore store(model, *be, AdapterStoreOptions{2, 8, 1 << 20});
  auto a = store.read("b", (tmp / "b-r8-all").string());
  EXPECT_TRUE(store.cached((tmp / "b-r8-all").string()));
  EXPECT_EQ(store.host_cache_bytes(), a->host_bytes());
  fs::remove_all(tmp / "b-r8-all");  // the disk copy is gone: the cache still serves it
  EXPECT_EQ(store.read("b", (tmp / "b-r8-all").string()).get(), a.get());
  AdapterStore small(model, *be, AdapterStoreOptions{1, 4, 1 << 20});
  try {
    small.read("b", (fs::path(f.dir) / "adapters/b-r8-all").string());
    FAIL();
  } catch (const quilt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_rank"), std::string::npos);
  }
  fs::remove_all(tmp);
}

TEST(AdapterSource, RootsLocalPathsAndHubCache) {
  const fs::path base = fs::temp_directory_path() / ("quilt_src_" + std::to_string(::getpid()));
  fs::remove_all(base);
  auto make = [](const fs::path& p) {
    fs::create_directories(p);
    std::ofstream(p / "adapter_config.json") << "{}";
  };
  make(base / "roots/a/org/one");
  make(base / "outside/two");
  make(base / "hub/models--org--three/snapshots/abc123");
  fs::create_directories(base / "hub/models--org--three/refs");
  std::ofstream(base / "hub/models--org--three/refs/main") << "abc123";
  AdapterSourceConfig cfg{{(base / "roots/a").string()}, (base / "hub").string()};
  EXPECT_EQ(resolve_adapter("org/one", "", cfg).path, fs::weakly_canonical(base / "roots/a/org/one").string());
  EXPECT_EQ(resolve_adapter("org/three", "", cfg).path, (base / "hub/models--org--three/snapshots/abc123").string());
  EXPECT_EQ(resolve_adapter("org/three", "hub", cfg).path, (base / "hub/models--org--three/snapshots/abc123").string());
  EXPECT_EQ(resolve_adapter((base / "roots/a/org/one").string(), "local", cfg).path,
            fs::weakly_canonical(base / "roots/a/org/one").string());
  auto status = [&](const std::string& id, const std::string& src) {
    try {
      resolve_adapter(id, src, cfg);
    } catch (const AdapterResolveError& e) {
      return std::make_pair(e.status, std::string(e.what()));
    }
    return std::make_pair(0, std::string());
  };
  auto [s1, m1] = status((base / "outside/two").string(), "local");
  EXPECT_EQ(s1, 400);
  EXPECT_NE(m1.find("adapters.roots"), std::string::npos) << m1;
  EXPECT_EQ(status((base / "roots/a/../../outside/two").string(), "local").first, 400);  // no escape by ..
  EXPECT_EQ(status("../outside/two", "").first, 400);
  EXPECT_EQ(status("org/missing", "").first, 404);
  EXPECT_EQ(status("org/one", "hub").first, 404);  // only in the roots
  EXPECT_EQ(status("org/one", "s3").first, 400);
  fs::remove_all(base);
}
