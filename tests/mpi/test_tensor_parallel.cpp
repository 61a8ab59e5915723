// Run under mpiexec -np 1, 2 and 4: the world is one tensor-parallel group. Each rank also builds
// the whole model alone (TP 1) and checks that the sharded logits agree within 1e-4 and that the
// greedy ids are the same, and that both match the Hugging Face fixtures.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>

#include "model/gemma_model.h"
#include "model/greedy.h"
#include "model/lora_adapter.h"
#include "runtime/comm/mpi_communicator.h"
#include "tests/model/batch_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;

namespace {
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}
}  // namespace

TEST(TensorParallel, ShardedModelMatchesWholeModelAndGolden) {
  const auto fixtures = quilt::testing::load_fixtures();
  MpiCommunicator world(MPI_COMM_WORLD);
  for (const auto& f : fixtures) {
    const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    auto be = make_backend("cpu");
    SoloCommunicator solo;
    GemmaForCausalLM whole(cfg, *be, solo, ckpt);
    GemmaForCausalLM sharded(cfg, *be, world, ckpt);
    EXPECT_EQ(sharded.tp().size, world_size());
    double worst_logit = 0, worst_golden = 0;
    for (const auto* c : f.base_cases()) {
      const GreedyResult a = greedy_generate(whole, c->prompt_ids, f.max_new_tokens, cfg.eos_token_ids);
      const GreedyResult b = greedy_generate(sharded, c->prompt_ids, f.max_new_tokens, cfg.eos_token_ids);
      ASSERT_EQ(a.last_prompt_logits.size(), b.last_prompt_logits.size());
      for (size_t v = 0; v < a.last_prompt_logits.size(); ++v) {
        const double d = std::abs(a.last_prompt_logits[v] - b.last_prompt_logits[v]);
        worst_logit = std::max(worst_logit, d);
        EXPECT_LE(d, 1e-4) << f.name << " vocab " << v;
      }
      EXPECT_EQ(a.greedy_ids, b.greedy_ids) << f.name;
      EXPECT_EQ(b.greedy_ids, c->greedy_ids) << f.name;
      for (size_t i = 1; i < c->prompt_logprobs.size(); ++i) {
        const double d = std::abs(*b.prompt_logprobs[i] - *c->prompt_logprobs[i]);
        worst_golden = std::max(worst_golden, d);
        EXPECT_LE(d, 1e-3) << f.name << " token " << i;
      }
      if (!c->last_logits.empty()) {  // HF's own logits, stored to 6 significant digits
        ASSERT_EQ(c->last_logits.size(), b.last_prompt_logits.size());
        for (size_t v = 0; v < c->last_logits.size(); ++v)
          EXPECT_NEAR(b.last_prompt_logits[v], c->last_logits[v], 1e-3 + 1e-5 * std::abs(c->last_logits[v]))
              << f.name << " vocab " << v;
      }
    }
    if (world.rank() == 0)
      std::printf("[tp=%d] %-24s max |logit TP%d - TP1| = %.3g, max |logprob - HF| = %.3g\n", world_size(),
                  f.name.c_str(), world_size(), worst_logit, worst_golden);
  }
}

TEST(TensorParallel, MixedBatchOnShardsMatchesWholeModel) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  MpiCommunicator world(MPI_COMM_WORLD);
  const auto& f = fixtures.back();
  const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
  const Checkpoint ckpt = Checkpoint::open(f.dir);
  auto be = make_backend("cpu");
  SoloCommunicator solo;
  GemmaForCausalLM whole(cfg, *be, solo, ckpt);
  GemmaForCausalLM sharded(cfg, *be, world, ckpt);
  quilt::testing::BatchRunner ra(whole, 32), rb(sharded, 32);
  const auto cases = f.base_cases();
  std::vector<std::pair<int, int>> work;
  for (const auto* c : cases) {
    const int s = ra.add_sequence(c->prompt_ids);
    rb.add_sequence(c->prompt_ids);
    work.push_back({s, static_cast<int>(c->prompt_ids.size())});
  }
  auto a = ra.step(work), b = rb.step(work);
  for (const auto& [s, rows] : a) {
    ASSERT_EQ(rows.size(), b[s].size());
    for (size_t k = 0; k < rows.size(); ++k) ASSERT_NEAR(rows[k], b[s][k], 1e-4) << "seq " << s << " at " << k;
  }
}

// LoRA at TP = world size: column adapters sharded by output, row adapters by input with the
// partial output joining the all-reduce. Every adapter case must match PEFT and TP 1.
TEST(TensorParallel, LoraAdaptersShardedMatchPeftAndWholeModel) {
  const auto fixtures = quilt::testing::load_fixtures();
  MpiCommunicator world(MPI_COMM_WORLD);
  for (const auto& f : fixtures) {
    const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    auto be = make_backend("cpu");
    SoloCommunicator solo;
    GemmaForCausalLM whole(cfg, *be, solo, ckpt);
    GemmaForCausalLM sharded(cfg, *be, world, ckpt);
    double worst_logit = 0, worst_golden = 0;
    for (const auto& c : f.cases) {
      if (!c.adapter) continue;
      const HostLoraAdapter host = HostLoraAdapter::load(f.dir + "/adapters/" + *c.adapter, *c.adapter, cfg);
      const LoraAdapterShard aw = whole.load_adapter(host), as = sharded.load_adapter(host);
      const GreedyResult a = greedy_generate(whole, c.prompt_ids, f.max_new_tokens, cfg.eos_token_ids, &aw);
      const GreedyResult b = greedy_generate(sharded, c.prompt_ids, f.max_new_tokens, cfg.eos_token_ids, &as);
      for (size_t v = 0; v < a.last_prompt_logits.size(); ++v) {
        const double d = std::abs(a.last_prompt_logits[v] - b.last_prompt_logits[v]);
        worst_logit = std::max(worst_logit, d);
        EXPECT_LE(d, 1e-4) << f.name << " " << *c.adapter;
      }
      EXPECT_EQ(b.greedy_ids, c.greedy_ids) << f.name << " " << *c.adapter;
      for (size_t i = 1; i < c.prompt_logprobs.size(); ++i) {
        const double d = std::abs(*b.prompt_logprobs[i] - *c.prompt_logprobs[i]);
        worst_golden = std::max(worst_golden, d);
        EXPECT_LE(d, 1e-3) << f.name << " " << *c.adapter << " token " << i;
      }
    }
    if (world.rank() == 0)
      std::printf("[tp=%d lora] %-24s max |logit TP%d - TP1| = %.3g, max |logprob - PEFT| = %.3g\n", world_size(),
                  f.name.c_str(), world_size(), worst_logit, worst_golden);
  }
}
