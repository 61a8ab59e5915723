// Decode timing of the CUDA backend (issue 5): Gemma shapes with random weights generated on the
// GPU (no checkpoint), batch B, every sequence at context C, tensor parallel over --tp ranks
// (run under mpirun -np TP; NCCL through runtime/comm's make_communicator).
//
// One step issues exactly the op sequence of GemmaForCausalLM::forward (model/gemma_model.cpp):
// the i32 inputs go up with from_host_i32, activations come from the stream-ordered pool, the
// activations are all-reduced after the embedding, o and down, the vocab shards of the logits are
// all-gathered, and the logits come back with to_host_f32. Each sequence re-writes its slot C-1
// every step, so every step attends over exactly C keys. Host wall clock per step (the latency a
// client sees, download included), median over --steps after 5 warm-up steps.
//
// Every figure is printed as measured / bound = ratio, with the GPU's name:
//  - decode step: bound = (this rank's weight bytes + KV bytes read per step) / bandwidth, at the
//    spec bandwidth (--hbm-tbs, H100 SXM 3.35 TB/s) and at the device-to-device copy bandwidth
//    measured here (bytes read + written);
//  - per op (TP 1, --ops): each op of layer 0 run 50 times back to back ("warm": host wall / 50;
//    "graph": 20 launches recorded in a CUDA graph, replayed, GPU time / launch, with PDL between
//    them); for ops that read weights or KV, also "cold": one launch after a 256 MB memset that
//    flushes the L2 (as ncu does), GPU time from events, median of 10, as TB/s and % of --hbm-tbs;
//    bound = its weight or KV bytes / copy bandwidth. Rows marked "(alt)" time kernels the backend
//    may not pick (stage-1 attention, each GEMV kernel forced, cuBLAS), for comparison;
//  - all-reduce (TP > 1): a decode-sized all-reduce (B x hidden bf16) on the compute stream, 200
//    back to back, against the goal of 8 us.
//
//   bench_cuda_decode --preset gemma-2b --batch 1 --context 512 --ops
//   mpirun -np 2 bench_cuda_decode --preset gemma-7b --batch 1 --context 512 --tp 2
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/comm/make_communicator.h"
#include "runtime/core/check.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  int layers, hidden, heads, kv_heads, head_dim, inter, vocab;
};

struct Layer {
  Tensor input_norm, post_norm, qkv, o, gate_up, down;
};

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "gemma-2b";
  int B = 1, C = 512, steps = 50, tp = 1;
  bool ops_table = false;
  int gemv_rows = -1;  // -1: the backend's default
  double hbm_tbs = 3.35;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--preset") preset = next();
    else if (a == "--batch") B = std::stoi(next());
    else if (a == "--context") C = std::stoi(next());
    else if (a == "--steps") steps = std::stoi(next());
    else if (a == "--hbm-tbs") hbm_tbs = std::stod(next());
    else if (a == "--tp") tp = std::stoi(next());
    else if (a == "--ops") ops_table = true;
    else if (a == "--gemv-rows") gemv_rows = std::stoi(next());
    else {
      std::fprintf(stderr,
                   "usage: %s [--preset gemma-2b|gemma-7b] [--batch B] [--context C] [--steps N] [--hbm-tbs X] "
                   "[--tp P (under mpirun -np P)] [--ops] [--gemv-rows M]\n",
                   argv[0]);
      return 2;
    }
  }
  Shape s{};
  if (preset == "gemma-2b") s = {18, 2048, 8, 1, 256, 16384, 256000};
  else if (preset == "gemma-7b") s = {28, 3072, 16, 16, 256, 24576, 256000};
  else {
    std::fprintf(stderr, "unknown preset %s\n", preset.c_str());
    return 2;
  }
  int rank = 0;
  if (tp > 1) {
    MPI_Init(&argc, &argv);
    int world = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (world != tp) {
      if (rank == 0) std::fprintf(stderr, "--tp %d needs mpirun -np %d (got %d ranks)\n", tp, tp, world);
      MPI_Finalize();
      return 2;
    }
  }
  int rc = 0;
  try {
    const int gpus = cuda_device_count();
    QUILT_REQUIRE(gpus >= tp, "--tp ", tp, " needs ", tp, " GPUs, ", gpus, " visible");
    auto be = make_backend("cuda", BackendOptions{std::nullopt, rank % gpus});  // bf16
    std::unique_ptr<Communicator> comm;
    if (tp > 1) comm = make_communicator(*be, MPI_COMM_WORLD);
    else comm = std::make_unique<SoloCommunicator>();
    CudaKernelOptions fast{};
    if (gemv_rows >= 0) fast.gemv_max_rows = gemv_rows;
    cuda_set_kernel_options(*be, fast);
    const DType dt = be->compute_dtype();
    const std::string gpu = cuda_device_name(*be);
    QUILT_REQUIRE(s.heads % tp == 0 && s.inter % tp == 0 && (s.kv_heads % tp == 0 || tp % s.kv_heads == 0),
                  preset, " cannot be split ", tp, " ways");
    // This rank's shard (model/weights.h's TpLayout): KV heads replicated when tp > kv heads.
    const int64_t H = s.hidden, D = s.head_dim, Hq = s.heads / tp, Hkv = std::max(1, s.kv_heads / tp);
    const int64_t I = s.inter / tp, V = (s.vocab + tp - 1) / tp;
    const int64_t qkv_w = (Hq + 2 * Hkv) * D;
    uint64_t seed = 1 + 1000 * rank;
    size_t weight_bytes = 0;
    auto weight = [&](std::vector<int64_t> shape, float stddev) {
      Tensor t = be->empty(shape, dt);
      cuda_fill_normal(*be, t, seed++, stddev);
      weight_bytes += t.bytes();
      return t;
    };
    const Tensor embed = weight({V, H}, 0.02f);
    std::vector<Layer> layers;
    for (int l = 0; l < s.layers; ++l)
      layers.push_back({weight({H}, 0.1f), weight({H}, 0.1f), weight({qkv_w, H}, 1 / std::sqrt(float(H))),
                        weight({H, Hq * D}, 1 / std::sqrt(float(s.heads * D))),
                        weight({2 * I, H}, 1 / std::sqrt(float(H))), weight({H, I}, 1 / std::sqrt(float(s.inter)))});
    const Tensor final_norm = weight({H}, 0.1f);

    const int bs = 16, blocks_per_seq = (C + bs - 1) / bs;
    std::vector<Tensor> kc, vc;
    for (int l = 0; l < s.layers; ++l) {
      kc.push_back(be->kv_cache_tensor(int64_t{B} * blocks_per_seq, bs, static_cast<int>(Hkv), s.head_dim));
      vc.push_back(be->kv_cache_tensor(int64_t{B} * blocks_per_seq, bs, static_cast<int>(Hkv), s.head_dim));
      cuda_fill_normal(*be, kc.back(), seed++, 1.0f);
      cuda_fill_normal(*be, vc.back(), seed++, 1.0f);
    }
    cuda_synchronize(*be);

    // Decode inputs: sequence b owns blocks [b * blocks_per_seq, ...), decodes position C - 1.
    std::vector<int32_t> ids(B), pos(B, C - 1), slots(B), cu(B + 1), lens(B, C), tables(int64_t{B} * blocks_per_seq), rows(B);
    for (int b = 0; b < B; ++b) {
      ids[b] = (1000 + 7919 * b) % s.vocab;
      slots[b] = (b * blocks_per_seq + (C - 1) / bs) * bs + (C - 1) % bs;
      cu[b + 1] = b + 1;
      rows[b] = b;
      for (int k = 0; k < blocks_per_seq; ++k) tables[b * blocks_per_seq + k] = b * blocks_per_seq + k;
    }
    const RopeParams rp{static_cast<int>(Hq), static_cast<int>(Hkv), s.head_dim, 10000.f};
    const KvWriteParams kp{static_cast<int>(Hq), static_cast<int>(Hkv), s.head_dim, bs};
    const AttentionParams ap{static_cast<int>(Hq), static_cast<int>(Hkv), s.head_dim, bs, blocks_per_seq,
                             static_cast<float>(1.0 / std::sqrt(double(D)))};
    std::vector<float> logits(static_cast<size_t>(B) * V * tp);
    const float eps = 1e-6f;

    bool step_no_download = false;
    auto step = [&]() {
      const int64_t T = B;
      const Tensor tid = be->from_host_i32(ids.data(), {T});
      const Tensor tpos = be->from_host_i32(pos.data(), {T});
      const Tensor tslots = be->from_host_i32(slots.data(), {T});
      const Tensor tcu = be->from_host_i32(cu.data(), {T + 1});
      const Tensor tlens = be->from_host_i32(lens.data(), {T});
      const Tensor ttables = be->from_host_i32(tables.data(), {T, blocks_per_seq});
      Tensor x = be->empty({T, H}, dt), normed = be->empty({T, H}, dt), qkv = be->empty({T, qkv_w}, dt);
      Tensor attn = be->empty({T, Hq * D}, dt), proj = be->empty({T, H}, dt);
      Tensor gate_up = be->empty({T, 2 * I}, dt), act = be->empty({T, I}, dt);
      be->embedding(x, embed, tid, V * rank, std::sqrt(float(H)));
      comm->all_reduce_sum(x);
      be->rms_norm(normed, x, layers[0].input_norm, eps);
      for (int l = 0; l < s.layers; ++l) {
        const Layer& L = layers[l];
        be->matmul(qkv, normed, L.qkv, false);
        be->rope(qkv, tpos, rp);
        be->write_kv_cache(kc[l], vc[l], qkv, tslots, kp);
        be->paged_attention(attn, qkv, kc[l], vc[l], tcu, tlens, ttables, ap);
        be->matmul(proj, attn, L.o, false);
        comm->all_reduce_sum(proj);
        be->add_rms_norm(x, normed, proj, L.post_norm, eps);
        be->matmul(gate_up, normed, L.gate_up, false);
        be->gelu_tanh_mul(act, gate_up);
        be->matmul(proj, act, L.down, false);
        comm->all_reduce_sum(proj);
        be->add_rms_norm(x, normed, proj, l + 1 < s.layers ? layers[l + 1].input_norm : final_norm, eps);
      }
      const Tensor idx = be->from_host_i32(rows.data(), {T});
      Tensor h = be->empty({T, H}, dt), out = be->empty({T, V}, dt);
      be->gather_rows(h, normed, idx);
      be->matmul(out, h, embed, false);
      if (tp > 1) {
        Tensor all = be->empty({tp, T, V}, dt);
        comm->all_gather(all, out);
        be->to_host_f32(logits.data(), all);
      } else if (step_no_download) {
        cuda_synchronize(*be);
      } else {
        be->to_host_f32(logits.data(), out);
      }
    };

    for (int w = 0; w < 5; ++w) step();
    std::vector<double> times;
    for (int k = 0; k < steps; ++k) {
      if (tp > 1) MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = Clock::now();
      step();
      times.push_back(seconds(t0, Clock::now()));
    }
    const double step_ms = median(times) * 1e3;
    // The same step with the logits left on the GPU (a synchronisation instead of the download
    // and its conversion): what GPU sampling would leave.
    std::vector<double> gpu_times;
    if (tp == 1) {
      auto keep = logits;
      for (int k = 0; k < std::min(steps, 20); ++k) {
        const auto t0 = Clock::now();
        step_no_download = true;
        step();
        step_no_download = false;
        gpu_times.push_back(seconds(t0, Clock::now()));
      }
      logits = keep;
    }
    bool finite = true;
    for (float v : logits) finite = finite && std::isfinite(v);

    // Device-to-device copy bandwidth (read + write) of 1 GiB.
    Tensor big_a = be->empty({int64_t{1} << 29}, dt), big_b = be->empty({int64_t{1} << 29}, dt);
    be->copy(big_b, big_a);
    cuda_synchronize(*be);
    const auto c0 = Clock::now();
    for (int k = 0; k < 10; ++k) be->copy(big_b, big_a);
    cuda_synchronize(*be);
    const double copy_tbs = 10.0 * 2 * big_a.bytes() / seconds(c0, Clock::now()) / 1e12;
    big_a = Tensor();
    big_b = Tensor();

    const double kv_bytes = double(s.layers) * B * C * Hkv * D * 2 /*k,v*/ * dtype_size(dt);
    const double bytes = double(weight_bytes) + kv_bytes;
    const double bound_spec_ms = bytes / (hbm_tbs * 1e12) * 1e3;
    const double bound_meas_ms = bytes / (copy_tbs * 1e12) * 1e3;
    if (rank == 0) {
      std::printf("[bench] GPU %s, measured D2D copy %.2f TB/s (read + write)\n", gpu.c_str(), copy_tbs);
      std::printf("[bench] %s decode bf16 B=%d C=%d TP%d: measured %.3f ms/step (median of %d, min %.3f)%s\n",
                  preset.c_str(), B, C, tp, step_ms, steps, *std::min_element(times.begin(), times.end()) * 1e3,
                  finite ? "" : "  [non-finite logits]");
      if (!gpu_times.empty())
        std::printf("[bench]   same step without the logits download: %.3f ms (median of %zu)\n",
                    median(gpu_times) * 1e3, gpu_times.size());
      std::printf("[bench]   bytes per step per rank: weights %.3f GB + KV %.3f GB = %.3f GB\n", weight_bytes / 1e9,
                  kv_bytes / 1e9, bytes / 1e9);
      std::printf("[bench]   | %s | %s B=%d C=%d TP%d | measured %.3f ms | bound %.3f ms @%.2f TB/s spec | ratio %.2fx |"
                  " bound %.3f ms @%.2f TB/s copy | ratio %.2fx |\n",
                  gpu.c_str(), preset.c_str(), B, C, tp, step_ms, bound_spec_ms, hbm_tbs, step_ms / bound_spec_ms,
                  bound_meas_ms, copy_tbs, step_ms / bound_meas_ms);
    }

    if (tp > 1) {
      // Decode all-reduce: B x hidden bf16 on the compute stream, as after o and down.
      Tensor msg = be->zeros({B, H}, dt);
      for (int k = 0; k < 20; ++k) comm->all_reduce_sum(msg);
      cuda_synchronize(*be);
      std::vector<double> per;
      for (int rep = 0; rep < 5; ++rep) {
        MPI_Barrier(MPI_COMM_WORLD);
        const auto a0 = Clock::now();
        for (int k = 0; k < 200; ++k) comm->all_reduce_sum(msg);
        cuda_synchronize(*be);
        per.push_back(seconds(a0, Clock::now()) / 200 * 1e6);
      }
      const double us = median(per);
      if (rank == 0)
        std::printf("[bench]   | %s | all-reduce TP%d %lld B (B=%d x %lld bf16) | measured %.2f us | goal 8 us | ratio %.2fx |"
                    " per step: %d x = %.3f ms |\n",
                    gpu.c_str(), tp, static_cast<long long>(msg.bytes()), B, static_cast<long long>(H), us, us / 8.0,
                    2 * s.layers + 1, (2 * s.layers + 1) * us / 1e3);
    }

    // Where the time goes: each op of layer 0 (and the lm_head) back to back, 50 times.
    if (ops_table && tp == 1) {
      const int64_t T = B;
      const Tensor tpos = be->from_host_i32(pos.data(), {T}), tslots = be->from_host_i32(slots.data(), {T});
      const Tensor tcu = be->from_host_i32(cu.data(), {T + 1}), tlens = be->from_host_i32(lens.data(), {T});
      const Tensor ttables = be->from_host_i32(tables.data(), {T, blocks_per_seq});
      Tensor x = be->zeros({T, H}, dt), normed = be->zeros({T, H}, dt), qkv = be->zeros({T, qkv_w}, dt);
      Tensor attn = be->zeros({T, Hq * D}, dt), proj = be->zeros({T, H}, dt);
      Tensor gate_up = be->zeros({T, 2 * I}, dt), act = be->zeros({T, I}, dt), out = be->empty({T, V}, dt);
      cuda_fill_normal(*be, normed, 77, 1.0f);
      cuda_fill_normal(*be, qkv, 78, 1.0f);
      cuda_fill_normal(*be, act, 79, 1.0f);
      const Layer& L = layers[0];
      CudaKernelOptions old_attention = fast, cublas = fast;
      old_attention.grouped_attention = false;
      cublas.gemv_max_rows = 0;
      struct Op { std::string name; int per_step; double bytes; CudaKernelOptions opt; bool alt; std::function<void()> run; };
      const double e = dtype_size(dt);
      const double kv_op = double(B) * C * Hkv * D * 2 * e;
      const bool gemv_rows = B <= std::min(8, fast.gemv_max_rows);
      auto mm = [&](const char* name, Tensor& y, const Tensor& xx, const Tensor& w, int per_step) {
        const std::function<void()> run = [&, &y = y, &xx = xx, &w = w] { be->matmul(y, xx, w, false); };
        std::vector<Op> v{{std::string("matmul ") + name, per_step, double(w.bytes()), fast, false, run}};
        for (int k = 0; gemv_rows && k < cuda_gemv_kernel_count(); ++k) {
          CudaKernelOptions forced = fast;
          forced.gemv_kernel = k;
          v.push_back({std::string("matmul ") + name + " " + cuda_gemv_kernel_name(k), per_step, double(w.bytes()),
                       forced, true, run});
        }
        v.push_back({std::string("matmul ") + name + " cuBLAS", per_step, double(w.bytes()), cublas, true, run});
        return v;
      };
      std::vector<Op> ops = {
          {"rms_norm/add_rms_norm", 2 * s.layers, 0, fast, false, [&] { be->add_rms_norm(x, normed, proj, L.post_norm, eps); }},
          {"rope", s.layers, 0, fast, false, [&] { be->rope(qkv, tpos, rp); }},
          {"write_kv_cache", s.layers, 0, fast, false, [&] { be->write_kv_cache(kc[0], vc[0], qkv, tslots, kp); }},
          {"paged_attention", s.layers, kv_op, fast, false, [&] { be->paged_attention(attn, qkv, kc[0], vc[0], tcu, tlens, ttables, ap); }},
          {"paged_attention stage-1", s.layers, kv_op, old_attention, true, [&] { be->paged_attention(attn, qkv, kc[0], vc[0], tcu, tlens, ttables, ap); }},
          {"gelu_tanh_mul", s.layers, 0, fast, false, [&] { be->gelu_tanh_mul(act, gate_up); }},
      };
      for (auto&& v : {mm("qkv", qkv, normed, L.qkv, s.layers), mm("o", proj, attn, L.o, s.layers),
                       mm("gate_up", gate_up, normed, L.gate_up, s.layers), mm("down", proj, act, L.down, s.layers),
                       mm("lm_head", out, normed, embed, 1)})
        ops.insert(ops.end(), v.begin(), v.end());

      // GPU timing on the backend's stream: events, and a 256 MB memset that flushes the L2.
      auto cuda_ok = [](cudaError_t err, const char* what) {
        QUILT_REQUIRE(err == cudaSuccess, "bench_cuda_decode: ", what, ": ", cudaGetErrorString(err));
      };
      auto stream = static_cast<cudaStream_t>(cuda_native_stream(*be));
      Tensor flush = be->empty({int64_t{128} << 20}, dt);  // 256 MB (bf16/f16)
      cudaEvent_t ev0, ev1;
      cuda_ok(cudaEventCreate(&ev0), "cudaEventCreate");
      cuda_ok(cudaEventCreate(&ev1), "cudaEventCreate");
      auto elapsed_us = [&] {
        cuda_ok(cudaEventSynchronize(ev1), "cudaEventSynchronize");
        float ms = 0;
        cuda_ok(cudaEventElapsedTime(&ms, ev0, ev1), "cudaEventElapsedTime");
        return double(ms) * 1e3;
      };
      auto cold_us = [&](const Op& op) {
        std::vector<double> t;
        for (int rep = 0; rep < 11; ++rep) {
          cuda_ok(cudaMemsetAsync(flush.data(), rep + 1, flush.bytes(), stream), "cudaMemsetAsync");
          cuda_ok(cudaEventRecord(ev0, stream), "cudaEventRecord");
          op.run();
          cuda_ok(cudaEventRecord(ev1, stream), "cudaEventRecord");
          const double us = elapsed_us();
          if (rep > 0) t.push_back(us);  // the first one is a warm-up
        }
        return median(t);
      };
      auto graph_us = [&](const Op& op) {
        try {
          auto g = be->capture_graph([&] { for (int k = 0; k < 20; ++k) op.run(); });
          g->launch();
          cuda_synchronize(*be);
          cuda_ok(cudaEventRecord(ev0, stream), "cudaEventRecord");
          for (int r = 0; r < 5; ++r) g->launch();
          cuda_ok(cudaEventRecord(ev1, stream), "cudaEventRecord");
          return elapsed_us() / 100;
        } catch (const quilt::Error& err) {
          std::fprintf(stderr, "[ops] %s: no graph timing: %s\n", op.name.c_str(), err.what());
          return -1.0;
        }
      };

      double total = 0, total_graph = 0;
      if (rank == 0)
        std::printf("[ops] per op: warm = 50 back-to-back launches, host wall / 50; graph = 20 launches in a CUDA graph,"
                    " GPU time / launch; cold = one launch after a 256 MB L2 flush, GPU time (median of 10), as TB/s and"
                    " %% of %.2f TB/s; bound = weight or KV bytes / %.2f TB/s (D2D copy)\n", hbm_tbs, copy_tbs);
      for (const Op& op : ops) {
        cuda_set_kernel_options(*be, op.opt);
        op.run();
        cuda_synchronize(*be);
        const auto t0 = Clock::now();
        for (int k = 0; k < 50; ++k) op.run();
        cuda_synchronize(*be);
        const double us = seconds(t0, Clock::now()) / 50 * 1e6;
        const double gus = graph_us(op);
        if (!op.alt) {
          total += us * op.per_step;
          total_graph += (gus > 0 ? gus : us) * op.per_step;
        }
        const std::string label = op.name + (op.alt ? " (alt)" : "");
        std::printf("[ops]   %-32s warm %7.1f | graph %7.1f us x %3d = %8.1f us", label.c_str(), us, gus, op.per_step,
                    (gus > 0 ? gus : us) * op.per_step);
        if (op.bytes > 0) {
          const double cus = cold_us(op);
          const double bound_us = op.bytes / (copy_tbs * 1e12) * 1e6;
          const double tbs = op.bytes / (cus * 1e-6) / 1e12;
          std::printf(" | cold %7.1f us %5.2f TB/s %3.0f%% | bound %6.1f us | cold/bound %5.2fx", cus, tbs,
                      100 * tbs / hbm_tbs, bound_us, cus / bound_us);
        }
        std::printf("\n");
      }
      cuda_ok(cudaEventDestroy(ev0), "cudaEventDestroy");
      cuda_ok(cudaEventDestroy(ev1), "cudaEventDestroy");
      cuda_set_kernel_options(*be, fast);
      std::printf("[ops] sum of ops (picked kernels): warm %.3f ms, graph %.3f ms; step %.3f ms (rest: launch gaps,"
                  " uploads, the logits download)\n", total / 1e3, total_graph / 1e3, step_ms);
    }
  } catch (const quilt::Error& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n", e.what());
    rc = 1;
  }
  if (tp > 1) MPI_Finalize();
  return rc;
}
