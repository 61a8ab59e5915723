// quilt bench-step: times the worker's step (GemmaForCausalLM::forward, logits left on the device,
// then Backend::sample choosing each row's token greedily; only ids and logprobs come back)
// on random weights of a real Gemma shape, and prints each figure with its physical bound:
//   decode   ms/step at batch B and context C; bound = bytes read per step per rank (weights +
//            the KV of B x C tokens, in the KV dtype of --kv-dtype: fp8_e4m3 counts its scales)
//            / HBM bandwidth;
//   prefill  ms for one T-token prompt; bound = FLOPs (2 x weights x T + causal attention) / peak;
//   lora     decode at the LoRA batch with N distinct rank-r adapters on all 7 modules against
//            the base model at the same batch ("kept" = base time / LoRA time, goal >= 95%);
//   allreduce the decode all-reduce (TP > 1), back to back; bound = bytes x (P-1)/P / NVLink.
// Bandwidth and peak come from the GPU's name (H100 SXM 3.35 TB/s and 989 TFLOP/s bf16 dense,
// H200 4.8 TB/s) unless given. Under mpirun -np P the ranks form one TP group; rank 0 prints.
#include "launch/bench_step.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <thread>

#include "model/gemma_model.h"
#include "runtime/comm/make_communicator.h"
#include "runtime/core/check.h"
#ifdef QUILT_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace quilt {
namespace {

GemmaConfig preset_config(const std::string& name) {
  GemmaConfig c;
  c.head_dim = 256;
  c.vocab_size = 256000;
  if (name == "gemma-2b") {
    c.hidden_size = 2048, c.intermediate_size = 16384, c.num_hidden_layers = 18;
    c.num_attention_heads = 8, c.num_key_value_heads = 1;
  } else if (name == "gemma-7b") {
    c.hidden_size = 3072, c.intermediate_size = 24576, c.num_hidden_layers = 28;
    c.num_attention_heads = 16, c.num_key_value_heads = 16;
  } else if (name == "tiny") {
    c.hidden_size = 64, c.intermediate_size = 128, c.num_hidden_layers = 2;
    c.num_attention_heads = 4, c.num_key_value_heads = 1, c.head_dim = 16, c.vocab_size = 1000;
  } else {
    QUILT_FAIL("bench-step: unknown preset '", name, "' (gemma-2b, gemma-7b or tiny)");
  }
  return c;
}

struct DeviceInfo {
  std::string name = "cpu";
  double hbm_tbs = 0, peak_tflops = 0;
};

class Bench {
 public:
  Bench(const BenchStepOptions& o, MPI_Comm world) : o_(o), cfg_(preset_config(o.preset)) {
    MPI_Comm_rank(world, &rank_);
    MPI_Comm_size(world, &size_);
    BackendOptions bo;
#ifdef QUILT_HAVE_CUDA
    if (o.backend == "cuda") {
      const int gpus = cuda_device_count();
      QUILT_REQUIRE(gpus > 0, "bench-step: backend cuda but no GPU is visible");
      QUILT_REQUIRE(gpus >= size_, "bench-step: ", size_, " ranks need ", size_, " GPUs, ", gpus, " visible");
      bo.device = rank_;
    }
#endif
    be_ = make_backend(o.backend, bo);
    comm_ = make_communicator(*be_, world);
    tp_ = TpLayout::make(cfg_, comm_->rank(), comm_->size());
    dev_.hbm_tbs = o.hbm_tbs;
    dev_.peak_tflops = o.peak_tflops;
#ifdef QUILT_HAVE_CUDA
    if (o.backend == "cuda") {
      dev_.name = cuda_device_name(*be_);
      const bool h200 = dev_.name.find("H200") != std::string::npos;
      const bool h100 = dev_.name.find("H100") != std::string::npos;
      const bool pcie = dev_.name.find("PCIe") != std::string::npos;
      if (dev_.hbm_tbs <= 0) dev_.hbm_tbs = h200 ? 4.8 : h100 ? (pcie ? 2.0 : 3.35) : 0;
      if (dev_.peak_tflops <= 0) dev_.peak_tflops = (h200 || h100) ? (pcie ? 756 : 989.4) : 0;
    }
#endif
    if (o.backend == "cpu") dev_.name = "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " threads)";
  }

  void run() {
    say("quilt bench-step: %s, backend %s (%s, KV cache %s), TP %d, device %s; bandwidth %.2f TB/s, peak %.0f TFLOP/s%s\n",
        o_.preset.c_str(), be_->name().c_str(), dtype_name(be_->compute_dtype()), dtype_name(kv_dtype()), size_,
        dev_.name.c_str(), dev_.hbm_tbs, dev_.peak_tflops,
        dev_.hbm_tbs <= 0 ? " (unknown: bounds not printed; pass --hbm-tbs)" : "");
    make_weights();
    say("weights per rank: %.2f GiB\n", weight_bytes_ / double(1 << 30));
    say("%-44s %12s %12s %8s  %s\n", "figure", "measured", "bound", "ratio", "notes");
    if (want("decode")) decode_section();
    if (want("prefill")) prefill_section();
    if (want("lora")) lora_section();
    if (want("allreduce") && size_ > 1) allreduce_section();
  }

 private:
  bool want(const std::string& s) const {
    return o_.only.empty() || std::find(o_.only.begin(), o_.only.end(), s) != o_.only.end();
  }
  template <typename... A>
  void say(const char* fmt, A... a) const {
    if (rank_ == 0) {
      std::printf(fmt, a...);
      std::fflush(stdout);
    }
  }
  void figure(const std::string& name, double measured, const char* unit, double bound, const std::string& notes) {
    if (rank_ != 0) return;
    const double ratio = bound > 0 ? measured / bound : 0;
    char m[32], b[32], r[16];
    std::snprintf(m, sizeof m, "%.3f %s", measured, unit);
    if (bound > 0) std::snprintf(b, sizeof b, "%.3f %s", bound, unit), std::snprintf(r, sizeof r, "%.2fx", ratio);
    else std::snprintf(b, sizeof b, "-"), std::snprintf(r, sizeof r, "-");
    std::printf("%-44s %12s %12s %8s  %s\n", name.c_str(), m, b, r, notes.c_str());
    std::fflush(stdout);
    if (!o_.json_path.empty()) {
      std::ofstream f(o_.json_path, std::ios::app);
      f << "{\"preset\":\"" << o_.preset << "\",\"tp\":" << size_ << ",\"device\":\"" << dev_.name << "\",\"figure\":\""
        << name << "\",\"measured\":" << measured << ",\"unit\":\"" << unit << "\",\"bound\":" << bound
        << ",\"ratio\":" << ratio << ",\"notes\":\"" << notes << "\"}\n";
    }
  }

  Tensor random_tensor(const std::vector<int64_t>& shape, float stddev) {
    const uint64_t seed = 1 + 1000003ull * rank_ + seed_++;
#ifdef QUILT_HAVE_CUDA
    if (be_->device() == Device::cuda) {
      Tensor t = be_->empty(shape, be_->compute_dtype());
      cuda_fill_normal(*be_, t, seed, stddev);
      return t;
    }
#endif
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> h(static_cast<size_t>(n));
    std::mt19937_64 g(seed);
    std::normal_distribution<float> nd(0.f, stddev);
    for (auto& v : h) v = nd(g);
    return be_->from_host(h.data(), DType::f32, shape);
  }
  Tensor weight(const std::vector<int64_t>& shape, float stddev) {
    Tensor t = random_tensor(shape, stddev);
    weight_bytes_ += t.bytes();
    return t;
  }

  void make_weights() {
    const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
    GemmaWeights w;
    w.embed = weight({tp_.vocab_per_rank, H}, 0.02f);
    for (int l = 0; l < cfg_.num_hidden_layers; ++l) {
      LayerWeights L;
      L.input_norm = weight({H}, 0.1f);
      L.qkv = weight({(tp_.q_heads + 2 * tp_.kv_heads) * D, H}, 1 / std::sqrt(float(H)));
      L.o = weight({H, tp_.q_heads * D}, 1 / std::sqrt(float(cfg_.num_attention_heads * D)));
      L.post_norm = weight({H}, 0.1f);
      L.gate_up = weight({2 * tp_.intermediate, H}, 1 / std::sqrt(float(H)));
      L.down = weight({H, tp_.intermediate}, 1 / std::sqrt(float(cfg_.intermediate_size)));
      w.layers.push_back(std::move(L));
    }
    w.final_norm = weight({H}, 0.1f);
    model_ = std::make_unique<GemmaForCausalLM>(cfg_, *be_, *comm_, std::move(w));
    model_->set_kv_cache_dtype(kv_dtype());
  }

  // --kv-dtype: auto = the compute dtype.
  DType kv_dtype() const {
    QUILT_REQUIRE(o_.kv_dtype == "auto" || o_.kv_dtype == "fp8_e4m3", "bench-step: --kv-dtype must be auto or fp8_e4m3, not '",
                  o_.kv_dtype, "'");
    QUILT_REQUIRE(o_.kv_dtype == "auto" || be_->device() == Device::cuda, "bench-step: --kv-dtype ", o_.kv_dtype,
                  " needs --backend cuda");
    return o_.kv_dtype == "fp8_e4m3" ? DType::fp8_e4m3 : be_->compute_dtype();
  }
  const char* kv_name() const { return dtype_name(kv_dtype()); }
  // Every layer's k and v of one token on this rank, in the KV dtype (fp8: values and scales).
  size_t kv_bytes_per_token() const {
    return static_cast<size_t>(cfg_.num_hidden_layers) * 2 * be_->kv_cache_bytes_per_slot(tp_.kv_heads, cfg_.head_dim, kv_dtype());
  }

  // B sequences, each decoding at context C (the same position every step, so the context stays C).
  ForwardInputs decode_inputs(int B, int C, int block_size) const {
    const int nb = (C + block_size - 1) / block_size;
    ForwardInputs in;
    in.max_blocks_per_seq = nb;
    in.cu_seqlen_prefill.push_back(0);
    for (int b = 0; b < B; ++b) {
      in.input_ids.push_back(static_cast<int32_t>((1000 + 7919ll * b) % cfg_.vocab_size));
      in.position_ids.push_back(C - 1);
      in.slots.push_back((b * nb + (C - 1) / block_size) * block_size + (C - 1) % block_size);
      in.cu_seqlen_prefill.push_back(b + 1);
      in.seqlen.push_back(C);
      for (int k = 0; k < nb; ++k) in.block_tables.push_back(b * nb + k);
    }
    in.max_s = C;
    return in;
  }

  // Median wall time of forward() in ms over `steps` after `warmup` untimed steps; every rank
  // runs the same steps (the collectives need it).
  // The worker's step (runtime/worker/model_runner.cpp): forward with the logits left on the
  // device, then Backend::sample for every logits row (greedy, the logprob of the choice), whose
  // small download completes the step.
  void step(const ForwardInputs& in, KvCache& kv) {
    ForwardOutput out = model_->forward(in, kv);
    if (out.rows == 0) return;
    SampleBatch batch;
    batch.vocab = cfg_.vocab_size;
    for (int64_t r = 0; r < out.rows; ++r) {
      SampleRow row;
      row.row = static_cast<int32_t>(r);
      batch.rows.push_back(row);
    }
    SampleResult res;
    be_->sample(res, out.device_logits, batch);
  }
  double time_forward(ForwardInputs in, KvCache& kv, int warmup, int steps) {
    in.logits_on_device = true;
    for (int i = 0; i < warmup; ++i) step(in, kv);
    std::vector<double> ms;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      step(in, kv);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }

  // A KV cache of `blocks` blocks, or nullopt (with a line saying so) when it does not fit.
  std::optional<KvCache> try_kv(int64_t blocks, const std::string& what) {
    int ok = 1;
    std::optional<KvCache> kv;
    try {
      kv = model_->allocate_kv_cache(static_cast<int>(blocks), kBlock);
    } catch (const std::exception& e) {
      ok = 0;
    }
    // Every rank skips together.
    int all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all) {
      kv.reset();
      say("%-44s %12s  KV of %.1f GiB per rank does not fit\n", what.c_str(), "skipped",
          blocks * kBlock * kv_bytes_per_token() / double(1 << 30));
      return std::nullopt;
    }
    return kv;
  }

  double bound_ms(double bytes) const { return dev_.hbm_tbs > 0 ? bytes / (dev_.hbm_tbs * 1e12) * 1e3 : 0; }

  void decode_section() {
    std::vector<int> graph_modes;
    if (o_.graphs == "off" || o_.graphs == "both") graph_modes.push_back(0);
    if ((o_.graphs == "on" || o_.graphs == "both") && be_->supports_graphs()) graph_modes.push_back(1);
    if (o_.graphs == "on" && !be_->supports_graphs()) say("decode: backend %s has no graphs; eager only\n", be_->name().c_str());
    const int max_b = *std::max_element(o_.batches.begin(), o_.batches.end());
    for (int C : o_.contexts)
      for (int B : o_.batches) {
        char name[96];
        std::snprintf(name, sizeof name, "decode B=%d C=%d", B, C);
        const int64_t nb = (C + kBlock - 1) / kBlock;
        auto kv = try_kv(B * nb, name);
        if (!kv) continue;
        const ForwardInputs in = decode_inputs(B, C, kBlock);
        const double bytes = double(weight_bytes_) + double(B) * C * kv_bytes_per_token();
        for (int g : graph_modes) {
          model_->set_decode_graphs(g ? max_b : 0);
          const double ms = time_forward(in, *kv, 3, o_.steps);
          char notes[160];
          std::snprintf(notes, sizeof notes, "%s; KV %s; %.0f tok/s; %.2f GB read/step/rank%s", g ? "graph" : "eager",
                        kv_name(), B * 1e3 / ms, bytes / 1e9,
                        g && !model_->last_forward_replayed_graph() ? " (NOT replayed)" : "");
          figure(std::string(name) + (g ? " graph" : " eager"), ms, "ms", bound_ms(bytes), notes);
        }
        model_->set_decode_graphs(0);
      }
  }

  void prefill_section() {
    const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
    const double layer_params = double(weight_bytes_) / dtype_size(be_->compute_dtype()) -
                                double(tp_.vocab_per_rank) * H;  // without the embedding
    for (int T : o_.prefills) {
      char name[96];
      std::snprintf(name, sizeof name, "prefill T=%d", T);
      const int64_t nb = (T + kBlock - 1) / kBlock;
      auto kv = try_kv(nb, name);
      if (!kv) continue;
      ForwardInputs in;
      in.max_blocks_per_seq = static_cast<int>(nb);
      in.cu_seqlen_prefill = {0, T};
      in.seqlen = {T};
      in.max_s = T;
      for (int t = 0; t < T; ++t) {
        in.input_ids.push_back(static_cast<int32_t>((17 + 7919ll * t) % cfg_.vocab_size));
        in.position_ids.push_back(t);
        in.slots.push_back(t);
      }
      for (int k = 0; k < nb; ++k) in.block_tables.push_back(k);
      in.lm_head_indices = {T - 1};
      double ms = 0;
      try {
        ms = time_forward(in, *kv, 1, 3);
      } catch (const std::exception& e) {
        say("%-44s %12s  %s\n", name, "failed", e.what());
        continue;
      }
      const double attn_flops = 4.0 * cfg_.num_hidden_layers * tp_.q_heads * D * (double(T) * (T + 1) / 2);
      const double flops = 2.0 * layer_params * T + 2.0 * H * tp_.vocab_per_rank + attn_flops;
      const double bound = dev_.peak_tflops > 0 ? flops / (dev_.peak_tflops * 1e12) * 1e3 : 0;
      char notes[160];
      std::snprintf(notes, sizeof notes, "%.0f tok/s; %.1f TFLOP/s achieved (%.1f TFLOP per rank)", T * 1e3 / ms,
                    flops / (ms * 1e-3) / 1e12, flops / 1e12);
      figure(name, ms, "ms", bound, notes);
    }
  }

  LoraAdapterShard random_adapter(int index, int rank) {
    LoraAdapterShard a;
    a.name = "bench-" + std::to_string(index);
    a.layers.resize(cfg_.num_hidden_layers);
    for (int l = 0; l < cfg_.num_hidden_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const auto [in, out] = lora_local_dims(static_cast<LoraTarget>(t), cfg_, tp_);
        LoraModuleShard m;
        m.rank = rank;
        m.A = random_tensor({rank, in}, 1 / std::sqrt(float(in)));
        m.B = random_tensor({out, rank}, 0.01f);
        a.device_bytes += m.A.bytes() + m.B.bytes();
        a.layers[l][t] = std::move(m);
      }
    return a;
  }

  void lora_section() {
    const int B = o_.lora_batch, C = o_.lora_context;
    char base_name[96];
    std::snprintf(base_name, sizeof base_name, "lora base B=%d C=%d", B, C);
    const int64_t nb = (C + kBlock - 1) / kBlock;
    auto kv = try_kv(B * nb, base_name);
    if (!kv) return;
    const ForwardInputs base = decode_inputs(B, C, kBlock);
    const double bytes = double(weight_bytes_) + double(B) * C * kv_bytes_per_token();
    model_->set_decode_graphs(0);
    const double eager = time_forward(base, *kv, 3, o_.steps);
    figure(std::string(base_name) + " eager", eager, "ms", bound_ms(bytes), "base model, no adapter");
    double best_base = eager;
    if (be_->supports_graphs()) {
      model_->set_decode_graphs(B);
      const double graph = time_forward(base, *kv, 3, o_.steps);
      figure(std::string(base_name) + " graph", graph, "ms", bound_ms(bytes), "base model, no adapter");
      model_->set_decode_graphs(0);
      best_base = std::min(eager, graph);
    }
    for (int N : o_.lora_adapters) {
      if (N > B) continue;
      std::vector<LoraAdapterShard> adapters;
      double lora_bytes = 0;
      for (int i = 0; i < N; ++i) {
        adapters.push_back(random_adapter(i, o_.lora_rank));
        lora_bytes += adapters.back().device_bytes;
      }
      ForwardInputs in = base;
      // Rows grouped by adapter (the worker sorts a batch that way): adapter i owns an equal share.
      for (int i = 0; i < N; ++i)
        in.adapter_data.segments.push_back(AdapterSegment{static_cast<int32_t>(int64_t(B) * i / N),
                                                          static_cast<int32_t>(int64_t(B) * (i + 1) / N), &adapters[i]});
      // Eagerly and replayed from the bucket's graph (the adapter mix is the graph's data,
      // lora_plan.h), as --graphs says for decode.
      std::vector<int> modes;
      if (o_.graphs == "off" || o_.graphs == "both" || !be_->supports_graphs()) modes.push_back(0);
      if ((o_.graphs == "on" || o_.graphs == "both") && be_->supports_graphs()) modes.push_back(1);
      for (int g : modes) {
        char name[96];
        std::snprintf(name, sizeof name, "lora B=%d C=%d %d adapters r%d%s", B, C, N, o_.lora_rank, g ? " graph" : "");
        double ms = 0;
        try {
          model_->set_decode_graphs(g ? B : 0);
          ms = time_forward(in, *kv, 2, o_.steps);
        } catch (const std::exception& e) {
          model_->set_decode_graphs(0);
          say("%-44s %12s  %s\n", name, "failed", e.what());
          return;
        }
        char notes[200];
        std::snprintf(notes, sizeof notes, "%s; kept %.1f%% of the best base (goal >= 95%%); %.0f tok/s; +%.1f MB adapters",
                      !g ? "eager" : model_->last_forward_replayed_graph() ? "graph" : "graph NOT replayed",
                      100.0 * best_base / ms, B * 1e3 / ms, lora_bytes / 1e6);
        figure(name, ms, "ms", bound_ms(bytes + lora_bytes), notes);
      }
      model_->set_decode_graphs(0);
    }
  }

  void allreduce_section() {
    const int64_t H = cfg_.hidden_size;
    for (int B : {1, 8, 64, 256}) {
      Tensor x = random_tensor({B, H}, 1.f);
      Tensor one = be_->empty({1}, be_->compute_dtype());
      float sink = 0;
      constexpr int kIters = 200;
      for (int i = 0; i < 10; ++i) comm_->all_reduce_sum(x);
      be_->to_host_f32(&sink, one);  // waits for the stream
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kIters; ++i) comm_->all_reduce_sum(x);
      be_->to_host_f32(&sink, one);
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / kIters;
      const double bytes = double(x.bytes());
      const double nvlink_bound_us = bytes * (size_ - 1) / size_ / 450e9 * 1e6;  // H100 SXM: 450 GB/s per direction
      char name[96], notes[160];
      std::snprintf(name, sizeof name, "all-reduce TP%d [%d x %lld]", size_, B, static_cast<long long>(H));
      std::snprintf(notes, sizeof notes, "%.0f KB, back to back on the compute stream; bound: NVLink 450 GB/s", bytes / 1024);
      figure(name, us, "us", nvlink_bound_us, notes);
    }
  }

  static constexpr int kBlock = 16;
  BenchStepOptions o_;
  GemmaConfig cfg_;
  int rank_ = 0, size_ = 1;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<Communicator> comm_;
  TpLayout tp_;
  DeviceInfo dev_;
  size_t weight_bytes_ = 0;
  uint64_t seed_ = 0;
  std::unique_ptr<GemmaForCausalLM> model_;
};

}  // namespace

int run_bench_step(const BenchStepOptions& options, MPI_Comm world) {
  Bench b(options, world);
  b.run();
  return 0;
}

}  // namespace quilt
