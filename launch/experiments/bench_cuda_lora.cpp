// Multi-LoRA timing of the CUDA backend (issue 5): one Gemma layer's 7 LoRA modules as the model
// issues them (model/gemma_model.cpp): q/k/v in one lora_sgmv_multi into the fused qkv row, o,
// gate/up in one lora_sgmv_multi into gate_up, down; random rank-r adapters generated on the GPU.
//
// Decode batches of B rows (one row per sequence) with D distinct adapters (row b uses adapter
// b % D, so with D > 1 every row is its own segment and an adapter's rows are scattered, as an
// unsorted batch gives them), and prefill of P rows in one segment (1 adapter) or 8 equal ones
// (8 adapters). Each call is timed `--iters` times back to back after a warm-up, rotating over
// enough copies of the adapters (>= 128 MB) that their weights come from HBM, not L2; x and y stay
// the same (in a step they were just written by the previous op). Figures per call:
//   gpu us   CUDA events on the backend's stream / iters
//   wall us  host wall clock for the loop, the final synchronisation included / iters (host
//            planning + upload of the segment table; above gpu us when the host is the limit)
//   bound us (distinct adapters' A and B + x rows read + y rows read and written) / --hbm-tbs
//   ratio    gpu us / bound us
//
//   bench_cuda_lora [--preset gemma-2b|gemma-7b] [--rank 16] [--iters 200] [--hbm-tbs 3.35]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  QUILT_REQUIRE(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

// One module: x width K, output width N at column col of y.
struct Module {
  const char* name;
  int64_t K, N, col;
};
// One call: modules sharing x and y.
struct Call {
  std::string name;
  int64_t K, y_width;
  std::vector<Module> mods;
};

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "gemma-2b";
  int rank = 16, iters = 200;
  double hbm_tbs = 3.35;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--preset") preset = next();
    else if (a == "--rank") rank = std::stoi(next());
    else if (a == "--iters") iters = std::stoi(next());
    else if (a == "--hbm-tbs") hbm_tbs = std::stod(next());
    else {
      std::fprintf(stderr, "usage: %s [--preset gemma-2b|gemma-7b] [--rank R] [--iters N] [--hbm-tbs X]\n", argv[0]);
      return 2;
    }
  }
  int64_t H, q_w, kv_w, I;
  if (preset == "gemma-2b") H = 2048, q_w = 8 * 256, kv_w = 256, I = 16384;
  else if (preset == "gemma-7b") H = 3072, q_w = 16 * 256, kv_w = 16 * 256, I = 24576;
  else {
    std::fprintf(stderr, "unknown preset %s\n", preset.c_str());
    return 2;
  }
  try {
    QUILT_REQUIRE(cuda_device_count() > 0, "no CUDA device visible");
    auto be = make_backend("cuda");  // bf16
    const DType dt = be->compute_dtype();
    const size_t es = dtype_size(dt);
    auto stream = static_cast<cudaStream_t>(cuda_native_stream(*be));
    const std::vector<Call> calls = {
        {"qkv", H, q_w + 2 * kv_w, {{"q", H, q_w, 0}, {"k", H, kv_w, q_w}, {"v", H, kv_w, q_w + kv_w}}},
        {"o", q_w, H, {{"o", q_w, H, 0}}},
        {"gate_up", H, 2 * I, {{"gate", H, I, 0}, {"up", H, I, I}}},
        {"down", I, H, {{"down", I, H, 0}}},
    };
    size_t adapter_bytes = 0;  // one adapter, one layer, 7 modules
    for (const Call& c : calls)
      for (const Module& m : c.mods) adapter_bytes += static_cast<size_t>(rank) * (m.K + m.N) * es;
    std::printf("bench_cuda_lora: %s, %s layer (7 modules in 4 calls), rank %d, %s, bound at %.2f TB/s; "
                "one adapter's layer = %.2f MB\n",
                cuda_device_name(*be).c_str(), preset.c_str(), rank, dtype_name(dt), hbm_tbs, adapter_bytes / 1e6);
    std::printf("%-8s %4s %8s %-8s %9s %9s %9s %7s %9s\n", "shape", "rows", "adapters", "call", "gpu_us", "wall_us",
                "bound_us", "ratio", "MB");

    struct Case {
      std::string shape;
      int rows, distinct, segments;  // segments: 0 = one per row (decode), else equal contiguous ones
    };
    std::vector<Case> cases;
    for (int B : {1, 8, 64, 256})
      for (int D : {1, 8, 32})
        if (D <= B || D == 1) cases.push_back({"decode", B, std::min(D, B), 0});
    cases.push_back({"prefill", 512, 1, 1});
    cases.push_back({"prefill", 512, 8, 8});

    uint64_t seed = 1;
    cudaEvent_t e0, e1;
    cuda_ok(cudaEventCreate(&e0), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&e1), "cudaEventCreate");
    for (const Case& cs : cases) {
      const int64_t T = cs.rows;
      // Enough copies of the D adapters that one rotation is >= 128 MB (past the 50 MB L2).
      const int copies = static_cast<int>(std::min<size_t>(
          64, std::max<size_t>(1, (size_t{128} << 20) / (adapter_bytes * cs.distinct) + 1)));
      // weights[copy][adapter][call][module] = (A, B)
      std::vector<std::vector<std::vector<std::vector<std::pair<Tensor, Tensor>>>>> w(copies);
      for (auto& wc : w) {
        wc.resize(cs.distinct);
        for (auto& wa : wc)
          for (const Call& c : calls) {
            wa.emplace_back();
            for (const Module& m : c.mods) {
              Tensor A = be->empty({rank, m.K}, dt), B = be->empty({m.N, rank}, dt);
              cuda_fill_normal(*be, A, seed++, 1.0f / std::sqrt(static_cast<float>(m.K)));
              cuda_fill_normal(*be, B, seed++, 0.01f);
              wa.back().emplace_back(std::move(A), std::move(B));
            }
          }
      }
      // Row -> adapter and the segments.
      struct Span {
        int32_t b, e;
        int adapter;
      };
      std::vector<Span> spans;
      if (cs.segments == 0) {
        if (cs.distinct == 1) spans.push_back({0, static_cast<int32_t>(T), 0});  // neighbours share one segment
        else
          for (int32_t b = 0; b < T; ++b) spans.push_back({b, b + 1, b % cs.distinct});
      } else {
        const int32_t per = static_cast<int32_t>(T / cs.segments);
        for (int s = 0; s < cs.segments; ++s) spans.push_back({s * per, s == cs.segments - 1 ? static_cast<int32_t>(T) : (s + 1) * per, s % cs.distinct});
      }
      // problems[copy][call]
      std::vector<std::vector<std::vector<LoraProblem>>> probs(copies);
      for (int cp = 0; cp < copies; ++cp)
        for (size_t ci = 0; ci < calls.size(); ++ci) {
          probs[cp].emplace_back();
          for (size_t mi = 0; mi < calls[ci].mods.size(); ++mi) {
            LoraProblem p{{}, calls[ci].mods[mi].col};
            for (const Span& s : spans) {
              const auto& ab = w[cp][s.adapter][ci][mi];
              p.segments.push_back(LoraSegment{s.b, s.e, &ab.first, &ab.second});
            }
            probs[cp].back().push_back(std::move(p));
          }
        }
      std::vector<Tensor> xs, ys;
      for (const Call& c : calls) {
        xs.push_back(be->empty({T, c.K}, dt));
        ys.push_back(be->empty({T, c.y_width}, dt));
        cuda_fill_normal(*be, xs.back(), seed++, 1.0f);
        cuda_fill_normal(*be, ys.back(), seed++, 1.0f);
      }
      for (int wu = 0; wu < std::min(copies, 3); ++wu)
        for (size_t ci = 0; ci < calls.size(); ++ci) be->lora_sgmv_multi(ys[ci], xs[ci], probs[wu][ci]);
      cuda_synchronize(*be);

      double total_gpu = 0, total_wall = 0, total_bound = 0, total_mb = 0;
      for (size_t ci = 0; ci < calls.size(); ++ci) {
        const Call& c = calls[ci];
        double bytes = 0;
        for (const Module& m : c.mods) bytes += static_cast<double>(cs.distinct) * rank * (m.K + m.N) * es;  // A, B
        bytes += static_cast<double>(T) * c.K * es;                                                             // x
        for (const Module& m : c.mods) bytes += 2.0 * T * m.N * es;                                            // y r+w
        const auto t0 = Clock::now();
        cuda_ok(cudaEventRecord(e0, stream), "cudaEventRecord");
        for (int it = 0; it < iters; ++it) be->lora_sgmv_multi(ys[ci], xs[ci], probs[it % copies][ci]);
        cuda_ok(cudaEventRecord(e1, stream), "cudaEventRecord");
        cuda_synchronize(*be);
        const double wall_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
        float ms = 0;
        cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        const double gpu_us = 1000.0 * ms / iters, bound_us = bytes / (hbm_tbs * 1e12) * 1e6;
        std::printf("%-8s %4d %8d %-8s %9.2f %9.2f %9.2f %7.2f %9.3f\n", cs.shape.c_str(), cs.rows, cs.distinct,
                    c.name.c_str(), gpu_us, wall_us, bound_us, gpu_us / bound_us, bytes / 1e6);
        total_gpu += gpu_us;
        total_wall += wall_us;
        total_bound += bound_us;
        total_mb += bytes / 1e6;
      }
      std::printf("%-8s %4d %8d %-8s %9.2f %9.2f %9.2f %7.2f %9.3f\n", cs.shape.c_str(), cs.rows, cs.distinct,
                  "layer", total_gpu, total_wall, total_bound, total_gpu / total_bound, total_mb);
      std::fflush(stdout);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_lora: %s\n", e.what());
    return 1;
  }
  return 0;
}
