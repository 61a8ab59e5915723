// Multi-LoRA timing of the CUDA backend (issue 5): one Gemma layer's 7 LoRA modules as the model
// issues them (model/gemma_model.cpp), random rank-r adapters generated on the GPU, bf16.
//
// Decode batches of B rows (one row per sequence) with D distinct adapters (row b uses adapter
// b % D: an adapter's rows are scattered, as an unsorted batch gives them), and prefill of P rows
// in one segment (1 adapter) or 8 equal ones (8 adapters). Weights rotate over enough copies of
// the adapters (>= 128 MB) that they come from HBM, not L2; x and y stay (in a step the previous
// op just wrote them). Two paths:
//
//  sgmv  lora_sgmv_multi per call (the stage-3 op: a host plan and an upload per call), timed per
//        call: q/k/v, o, gate/up, down. gpu us = CUDA events / iters; wall us = host clock with
//        the final synchronisation / iters; bound us = (distinct adapters' A and B + x read + y
//        read and written) / --hbm-tbs; ratio = gpu / bound.
//  plan  the step-level plan (lora_plan.h: lora_shrink + lora_expand per group, the gate/up
//        expand fused with the activation (lora_expand_gelu), 8 launches per layer, the copy
//        picked by the layer index), per layer:
//          eager        launched one by one, the shrink in line (no base matmul to overlap)
//          graph        the same recorded in a CUDA graph and replayed (the activation included)
//          base         the layer's 4 base matmuls and the activation alone (random weights of the
//                       layer's shape) in a graph
//          base+lora    the matmuls with the LoRA groups around them in a graph, the shrink
//                       beside the matmul (overlap) or in line; "added" = base+lora - base is the
//                       LoRA's cost per layer in a graphed step, "kept" = base / (base+lora) the
//                       share of the layer's matmul time a LoRA step keeps (bench-step's "kept"
//                       for the whole step is higher: attention and the rest add to the base).
//
//   bench_cuda_lora [--preset gemma-2b|gemma-7b] [--rank 16] [--iters 200] [--hbm-tbs 3.35] [--skip-sgmv]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "quilt/kernels/lora_plan.h"
#include "runtime/core/check.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  QUILT_REQUIRE(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

// One module: x width K, output width N at column col of y; `target` its LoraTarget index.
struct Module {
  const char* name;
  int target;
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
  bool skip_sgmv = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--preset") preset = next();
    else if (a == "--rank") rank = std::stoi(next());
    else if (a == "--iters") iters = std::stoi(next());
    else if (a == "--hbm-tbs") hbm_tbs = std::stod(next());
    else if (a == "--skip-sgmv") skip_sgmv = true;
    else {
      std::fprintf(stderr, "usage: %s [--preset gemma-2b|gemma-7b] [--rank R] [--iters N] [--hbm-tbs X] [--skip-sgmv]\n",
                   argv[0]);
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
    // LoraTarget: q 0, k 1, v 2, o 3, gate 4, up 5, down 6.
    const std::vector<Call> calls = {
        {"qkv", H, q_w + 2 * kv_w, {{"q", 0, H, q_w, 0}, {"k", 1, H, kv_w, q_w}, {"v", 2, H, kv_w, q_w + kv_w}}},
        {"o", q_w, H, {{"o", 3, q_w, H, 0}}},
        {"gate_up", H, 2 * I, {{"gate", 4, H, I, 0}, {"up", 5, H, I, I}}},
        {"down", I, H, {{"down", 6, I, H, 0}}},
    };
    size_t adapter_bytes = 0;  // one adapter, one layer, 7 modules
    for (const Call& c : calls)
      for (const Module& m : c.mods) adapter_bytes += static_cast<size_t>(rank) * (m.K + m.N) * es;
    std::printf("bench_cuda_lora: %s, %s layer (7 modules in 4 groups), rank %d, %s, bound at %.2f TB/s; "
                "one adapter's layer = %.2f MB\n",
                cuda_device_name(*be).c_str(), preset.c_str(), rank, dtype_name(dt), hbm_tbs, adapter_bytes / 1e6);

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

    // One layer of base weights for the matmuls beside the LoRA groups.
    std::vector<Tensor> base_w;
    uint64_t seed = 1;
    for (const Call& c : calls) {
      base_w.push_back(be->empty({c.y_width, c.K}, dt));
      cuda_fill_normal(*be, base_w.back(), seed++, 1.0f / std::sqrt(static_cast<float>(c.K)));
    }

    cudaEvent_t e0, e1;
    cuda_ok(cudaEventCreate(&e0), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&e1), "cudaEventCreate");
    // GPU microseconds per call of f, over n calls.
    auto gpu_us = [&](int n, const std::function<void()>& f) {
      cuda_synchronize(*be);
      cuda_ok(cudaEventRecord(e0, stream), "cudaEventRecord");
      for (int k = 0; k < n; ++k) f();
      cuda_ok(cudaEventRecord(e1, stream), "cudaEventRecord");
      cuda_synchronize(*be);
      float ms = 0;
      cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
      return 1000.0 * ms / n;
    };
    auto set_overlap = [&](bool on) {
      CudaKernelOptions o;
      o.lora_overlap = on;
      cuda_set_kernel_options(*be, o);
    };

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
      std::vector<Tensor> xs, ys;
      for (const Call& c : calls) {
        xs.push_back(be->empty({T, c.K}, dt));
        ys.push_back(be->empty({T, c.y_width}, dt));
        cuda_fill_normal(*be, xs.back(), seed++, 1.0f);
        cuda_fill_normal(*be, ys.back(), seed++, 1.0f);
      }
      double layer_bound = 0;
      std::vector<double> call_bytes;
      for (const Call& c : calls) {
        double bytes = 0;
        for (const Module& m : c.mods) bytes += static_cast<double>(cs.distinct) * rank * (m.K + m.N) * es;  // A, B
        bytes += static_cast<double>(T) * c.K * es;                                                             // x
        for (const Module& m : c.mods) bytes += 2.0 * T * m.N * es;                                            // y r+w
        call_bytes.push_back(bytes);
        layer_bound += bytes / (hbm_tbs * 1e12) * 1e6;
      }

      // ---- sgmv: lora_sgmv_multi per call --------------------------------------------------
      if (!skip_sgmv) {
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
        for (int wu = 0; wu < std::min(copies, 3); ++wu)
          for (size_t ci = 0; ci < calls.size(); ++ci) be->lora_sgmv_multi(ys[ci], xs[ci], probs[wu][ci]);
        cuda_synchronize(*be);
        std::printf("%-8s %4s %8s %-8s %9s %9s %9s %7s %9s\n", "sgmv", "rows", "adapters", "call", "gpu_us", "wall_us",
                    "bound_us", "ratio", "MB");
        double total_gpu = 0, total_wall = 0, total_mb = 0;
        for (size_t ci = 0; ci < calls.size(); ++ci) {
          const auto t0 = Clock::now();
          int it = 0;
          const double us = gpu_us(iters, [&] {
            be->lora_sgmv_multi(ys[ci], xs[ci], probs[it % copies][ci]);
            ++it;
          });
          const double wall_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
          const double bound_us = call_bytes[ci] / (hbm_tbs * 1e12) * 1e6;
          std::printf("%-8s %4d %8d %-8s %9.2f %9.2f %9.2f %7.2f %9.3f\n", cs.shape.c_str(), cs.rows, cs.distinct,
                      calls[ci].name.c_str(), us, wall_us, bound_us, us / bound_us, call_bytes[ci] / 1e6);
          total_gpu += us;
          total_wall += wall_us;
          total_mb += call_bytes[ci] / 1e6;
        }
        std::printf("%-8s %4d %8d %-8s %9.2f %9.2f %9.2f %7.2f %9.3f\n", cs.shape.c_str(), cs.rows, cs.distinct,
                    "layer", total_gpu, total_wall, layer_bound, total_gpu / layer_bound, total_mb);
      }

      // ---- plan: lora_shrink + lora_expand from a step plan -----------------------------------
      // The table's "layers" are the copies: layer c uses copy c's factors.
      LoraTable table(*be, copies, 7);
      std::vector<std::vector<LoraEntry>> entries(cs.distinct, std::vector<LoraEntry>(static_cast<size_t>(copies) * 7,
                                                                                     LoraEntry{nullptr, nullptr, 0, 0}));
      for (int a = 0; a < cs.distinct; ++a)
        for (int cp = 0; cp < copies; ++cp)
          for (size_t ci = 0; ci < calls.size(); ++ci)
            for (size_t mi = 0; mi < calls[ci].mods.size(); ++mi) {
              const auto& ab = w[cp][a][ci][mi];
              entries[a][static_cast<size_t>(cp) * 7 + calls[ci].mods[mi].target] =
                  LoraEntry{ab.first.data(), ab.second.data(), rank, 0};
            }
      table.begin_step();
      std::vector<int32_t> row_slot(T, -1);
      for (const Span& s : spans) {
        const int slot = table.slot(&entries[s.adapter], entries[s.adapter]);
        for (int32_t t = s.b; t < s.e; ++t) row_slot[t] = slot;
      }
      const std::vector<int32_t> words = lora_tiles(row_slot);
      LoraStep step;
      step.table = table.tensor();
      step.max_tiles = cs.shape == "decode" ? static_cast<int>(T) : words[0];  // decode: the bucket's launches
      step.max_rows = static_cast<int>(T);
      step.tiles = be->zeros({kLoraHeaderInts + int64_t{step.max_tiles} * kLoraTileInts + T}, DType::i32);
      Tensor used = step.tiles.slice_rows(0, static_cast<int64_t>(words.size()));
      be->upload_i32(used, words.data());
      step.partials = be->zeros({lora_partial_floats(step.max_tiles)}, DType::f32);
      step.layers = copies;
      step.modules = 7;
      std::vector<LoraGroup> groups;
      for (const Call& c : calls) {
        LoraGroup g;
        g.k = c.K;
        for (const Module& m : c.mods) g.add(m.target, m.col, m.N);
        groups.push_back(g);
      }
      // One layer as the model runs it: with_base adds the matmul between each group's shrink and
      // expand, and the activation after gate/up, into which the gate/up expand is fused.
      Tensor act = be->empty({T, I}, dt);
      auto layer = [&](int l, bool lora, bool with_base) {
        for (size_t ci = 0; ci < calls.size(); ++ci) {
          if (lora) be->lora_shrink(step, l, groups[ci], xs[ci]);
          if (with_base) be->matmul(ys[ci], xs[ci], base_w[ci], false);
          if (calls[ci].name == "gate_up") {
            if (lora) be->lora_expand_gelu(step, l, groups[ci], ys[ci], act);
            else if (with_base) be->gelu_tanh_mul(act, ys[ci]);
          } else if (lora) {
            be->lora_expand(step, l, groups[ci], ys[ci]);
          }
        }
      };
      // A graph of `copies` layers (every copy once), replayed iters / copies times (at least 2).
      auto graph_us = [&](bool lora, bool with_base) {
        for (int l = 0; l < copies; ++l) layer(l, lora, with_base);  // warm-up, GEMM tuning
        auto g = be->capture_graph([&] {
          for (int l = 0; l < copies; ++l) layer(l, lora, with_base);
        });
        g->launch();
        const int reps = std::max(2, iters / copies);
        return gpu_us(reps, [&] { g->launch(); }) / copies;
      };
      set_overlap(false);
      int it = 0;
      const double eager = gpu_us(iters, [&] { layer(it++ % copies, true, false); });
      const double graph = graph_us(true, false);
      const double base = graph_us(false, true);
      const double with_inline = graph_us(true, true);
      set_overlap(true);
      const double with_overlap = graph_us(true, true);
      std::printf("%-8s %4d rows %2d adapters, %3d tiles in a launch for %3d: plan per layer: eager %7.2f us, graph %7.2f us "
                  "(bound %6.2f us, %4.2fx); base matmuls %7.2f us; with LoRA: in line %7.2f us (added %6.2f, kept %5.1f%%), "
                  "shrink beside %7.2f us (added %6.2f, kept %5.1f%%)\n",
                  cs.shape.c_str(), cs.rows, cs.distinct, words[0], step.max_tiles, eager, graph, layer_bound,
                  graph / layer_bound, base, with_inline, with_inline - base, 100.0 * base / with_inline, with_overlap,
                  with_overlap - base, 100.0 * base / with_overlap);
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
