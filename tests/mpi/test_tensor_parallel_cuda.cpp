// Tensor parallelism on GPUs through NCCL (and the one-shot all-reduce), run under mpiexec -np 2 and 4 (one GPU per rank): each rank
// builds the whole model alone (TP 1, SoloCommunicator) and its shard over the communicator that
// make_communicator picks for the cuda backend (NCCL), both in f32 on its own GPU, and checks that
// the sharded logits agree with the whole model's within 1e-4, that the greedy ids are the same,
// and that both match the Hugging Face fixtures (1e-3, the CPU's bar). Label `cuda`: with fewer
// visible GPUs than ranks every test is skipped, never passed.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>

#include "kernels/cuda/cuda_backend.h"
#include "model/gemma_model.h"
#include "model/greedy.h"
#include "runtime/comm/make_communicator.h"
#include "runtime/comm/mpi_communicator.h"
#include "tests/model/batch_runner.h"
#include "tests/model/fixtures.h"

using namespace quilt;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

class TensorParallelCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    // Every rank sees the same devices, so every rank skips or none does.
    const int gpus = cuda_device_count();
    if (gpus < world_size()) {
      GTEST_SKIP() << "no CUDA device visible for each rank (" << gpus << " for " << world_size()
                   << " ranks): tensor parallelism on GPUs was not run";
    }
    be = make_backend("cuda", BackendOptions{DType::f32, world_rank() % gpus});
    comm = make_communicator(*be, MPI_COMM_WORLD);
  }
  std::unique_ptr<Backend> be;
  std::unique_ptr<Communicator> comm;
};

}  // namespace

TEST_F(TensorParallelCuda, CommunicatorIsNcclAndCollectivesAreRight) {
  ASSERT_EQ(comm->size(), world_size());
  if (world_size() > 1) {
    EXPECT_EQ(dynamic_cast<MpiCommunicator*>(comm.get()), nullptr);
  }
  const int P = world_size(), r = world_rank();
  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(r + 1) * 0.5f + static_cast<float>(i);
  Tensor t = be->from_host(x.data(), DType::f32, {1000});
  comm->all_reduce_sum(t);
  std::vector<float> got(1000);
  be->to_host_f32(got.data(), t);
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], 0.25f * P * (P + 1) + static_cast<float>(P * i)) << "all-reduce at " << i;
  Tensor all = be->empty({P, 1000}, DType::f32);
  Tensor mine = be->from_host(x.data(), DType::f32, {1000});
  comm->all_gather(all, mine);
  std::vector<float> g(static_cast<size_t>(P) * 1000);
  be->to_host_f32(g.data(), all);
  for (int p = 0; p < P; ++p) ASSERT_EQ(g[p * 1000 + 7], (p + 1) * 0.5f + 7.0f) << "all-gather from rank " << p;
}

TEST_F(TensorParallelCuda, ShardedModelMatchesWholeModelAndGolden) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  for (const auto& f : fixtures) {
    const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    SoloCommunicator solo;
    GemmaForCausalLM whole(cfg, *be, solo, ckpt);
    GemmaForCausalLM sharded(cfg, *be, *comm, ckpt);
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
    }
    if (world_rank() == 0)
      std::printf("[tp-cuda=%d] %-22s max |logit TP%d - TP1| = %.3g, max |logprob - HF| = %.3g\n", world_size(),
                  f.name.c_str(), world_size(), worst_logit, worst_golden);
  }
}

TEST_F(TensorParallelCuda, MixedBatchOnShardsMatchesWholeModel) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  for (const auto& f : fixtures) {
    const GemmaConfig cfg = GemmaConfig::from_file(f.dir + "/config.json");
    const Checkpoint ckpt = Checkpoint::open(f.dir);
    SoloCommunicator solo;
    GemmaForCausalLM whole(cfg, *be, solo, ckpt);
    GemmaForCausalLM sharded(cfg, *be, *comm, ckpt);
    quilt::testing::BatchRunner ra(whole, 32), rb(sharded, 32);
    std::vector<std::pair<int, int>> work;
    for (const auto* c : f.base_cases()) {
      const int s = ra.add_sequence(c->prompt_ids);
      rb.add_sequence(c->prompt_ids);
      work.push_back({s, static_cast<int>(c->prompt_ids.size())});
    }
    auto a = ra.step(work), b = rb.step(work);
    double worst = 0;
    for (const auto& [s, rows] : a) {
      ASSERT_EQ(rows.size(), b[s].size());
      for (size_t k = 0; k < rows.size(); ++k) {
        worst = std::max(worst, static_cast<double>(std::abs(rows[k] - b[s][k])));
        ASSERT_NEAR(rows[k], b[s][k], 1e-4) << f.name << " seq " << s << " at " << k;
      }
    }
    if (world_rank() == 0)
      std::printf("[tp-cuda=%d] %-22s mixed batch: max |logit TP%d - TP1| = %.3g\n", world_size(), f.name.c_str(),
                  world_size(), worst);
  }
}
