// Prefill attention alone on the CUDA backend (issue 5): paged_attention over one T-token prompt
// (q_len = context = T) for gemma-2b's heads (8 q heads over 1 KV head) and gemma-7b's (16/16),
// head_dim 256, bf16, block size 16 with shuffled block tables. Two paths of the same op:
//   new: AttentionParams with host copies of cu_seqlens/seqlens (the tensor-core prefill kernel,
//        kernels/cuda/prefill_attention.cu);
//   old: without them (the grouped decode kernel, one block per query row and KV head).
// Each figure is the median over --reps of CUDA-event time around back-to-back calls on the
// backend's stream (host planning and the plan upload included), after a warm-up call. Printed:
// ms, achieved TFLOP/s with causal FLOPs = 4 * T^2 / 2 * D * Hq, the GPU's dense bf16 peak (from
// its name, or --peak-tflops) and the ratio, the speed-up over the old path, and (T <= 2048) the
// largest difference between the two outputs relative to the output's RMS.
//
// --sweep: the q_len threshold (CudaKernelOptions::prefill_min_rows). Batches of 4 sequences of
// context 2048, each with q_len new rows (chunked prefill), prefill kernel forced for every
// sequence vs the decode kernels, for q_len 1..64: the threshold is the smallest q_len from which
// the prefill kernel is faster.
//
//   bench_cuda_prefill [--preset gemma-2b|gemma-7b|all] [--tokens 512,1024,...] [--reps N]
//                      [--peak-tflops X] [--no-old] [--sweep]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

using namespace quilt;

namespace {

struct Heads {
  const char* name;
  int hq, hkv;
};
constexpr int kD = 256, kBs = 16;

void cuda_ok(cudaError_t e, const char* what) { QUILT_REQUIRE(e == cudaSuccess, what, ": ", cudaGetErrorString(e)); }

double peak_for(const std::string& gpu) {
  // Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity).
  if (gpu.find("H100") != std::string::npos) {
    if (gpu.find("PCIe") != std::string::npos) return 756;
    if (gpu.find("NVL") != std::string::npos) return 835;
    return 989;  // SXM (the name says "HBM3")
  }
  if (gpu.find("H200") != std::string::npos || gpu.find("GH200") != std::string::npos) return 989;
  if (gpu.find("A100") != std::string::npos) return 312;
  return 0;
}

// One batch of sequences over a paged cache with random contents.
struct Batch {
  std::vector<int32_t> cu{0}, lens, tables;
  int max_blocks = 0;
  Tensor qkv, k, v, cu_d, lens_d, tables_d, out;
};

Batch make_batch(Backend& be, const Heads& h, const std::vector<std::pair<int, int>>& seqs /* ctx, q_len */,
                 std::mt19937& rng, uint64_t seed) {
  Batch b;
  int total_blocks = 0;
  for (auto [ctx, q] : seqs) {
    b.max_blocks = std::max(b.max_blocks, (ctx + kBs - 1) / kBs);
    total_blocks += (ctx + kBs - 1) / kBs;
  }
  std::vector<int32_t> free(total_blocks);
  std::iota(free.begin(), free.end(), 0);
  std::shuffle(free.begin(), free.end(), rng);
  b.tables.assign(seqs.size() * b.max_blocks, 0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int nb = (seqs[s].first + kBs - 1) / kBs;
    for (int i = 0; i < nb; ++i) {
      b.tables[s * b.max_blocks + i] = free.back();
      free.pop_back();
    }
    b.cu.push_back(b.cu.back() + seqs[s].second);
    b.lens.push_back(seqs[s].first);
  }
  const int64_t T = b.cu.back(), S = static_cast<int64_t>(seqs.size());
  b.qkv = be.empty({T, static_cast<int64_t>(h.hq + 2 * h.hkv) * kD}, DType::bf16);
  b.k = be.kv_cache_tensor(total_blocks, kBs, h.hkv, kD);
  b.v = be.kv_cache_tensor(total_blocks, kBs, h.hkv, kD);
  cuda_fill_normal(be, b.qkv, seed, 1.0f);
  cuda_fill_normal(be, b.k, seed + 1, 1.0f);
  cuda_fill_normal(be, b.v, seed + 2, 1.0f);
  b.cu_d = be.from_host_i32(b.cu.data(), {S + 1});
  b.lens_d = be.from_host_i32(b.lens.data(), {S});
  b.tables_d = be.from_host_i32(b.tables.data(), {S, b.max_blocks});
  b.out = be.empty({T, static_cast<int64_t>(h.hq) * kD}, DType::bf16);
  return b;
}

AttentionParams params(const Heads& h, Batch& b, bool host_copies) {
  AttentionParams ap{h.hq, h.hkv, kD, kBs, b.max_blocks, static_cast<float>(1.0 / std::sqrt(double(kD)))};
  if (host_copies) {
    ap.host_cu_seqlens = b.cu.data();
    ap.host_seqlens = b.lens.data();
    ap.num_seqs = static_cast<int>(b.lens.size());
  }
  return ap;
}

// Median ms per call over `reps` groups of `inner` calls, timed by CUDA events on the stream.
double time_ms(Backend& be, int reps, double target_ms, const std::function<void()>& call) {
  auto stream = static_cast<cudaStream_t>(cuda_native_stream(be));
  cudaEvent_t a, z;
  cuda_ok(cudaEventCreate(&a), "event");
  cuda_ok(cudaEventCreate(&z), "event");
  call();  // warm-up (shared-memory opt-in, scratch growth)
  cuda_synchronize(be);
  cuda_ok(cudaEventRecord(a, stream), "record");
  call();
  cuda_ok(cudaEventRecord(z, stream), "record");
  cuda_synchronize(be);
  float once = 0;
  cuda_ok(cudaEventElapsedTime(&once, a, z), "elapsed");
  const int inner = std::max(1, std::min(200, static_cast<int>(target_ms / std::max(once, 1e-3f))));
  std::vector<double> v;
  for (int r = 0; r < reps; ++r) {
    cuda_ok(cudaEventRecord(a, stream), "record");
    for (int i = 0; i < inner; ++i) call();
    cuda_ok(cudaEventRecord(z, stream), "record");
    cuda_synchronize(be);  // also frees the upload staging for the next group
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, a, z), "elapsed");
    v.push_back(ms / inner);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(z);
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double max_rel_diff(Backend& be, const Tensor& x, const Tensor& y) {
  std::vector<float> a(x.numel()), b(y.numel());
  be.to_host_f32(a.data(), x);
  be.to_host_f32(b.data(), y);
  double ss = 0, worst = 0;
  for (float f : b) ss += static_cast<double>(f) * f;
  const double rms = std::sqrt(ss / std::max<size_t>(1, b.size()));
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]));
  return rms > 0 ? worst / rms : worst;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "all";
  std::vector<int> tokens = {512, 1024, 2048, 4096, 8192};
  int reps = 5;
  double peak = -1;
  bool old = true, sweep = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--preset") preset = next();
    else if (a == "--tokens") {
      tokens.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) tokens.push_back(std::stoi(t));
    } else if (a == "--reps") reps = std::stoi(next());
    else if (a == "--peak-tflops") peak = std::stod(next());
    else if (a == "--no-old") old = false;
    else if (a == "--sweep") sweep = true;
    else {
      std::fprintf(stderr,
                   "usage: %s [--preset gemma-2b|gemma-7b|all] [--tokens 512,1024,...] [--reps N] "
                   "[--peak-tflops X] [--no-old] [--sweep]\n",
                   argv[0]);
      return 2;
    }
  }
  std::vector<Heads> heads;
  if (preset == "gemma-2b" || preset == "all") heads.push_back({"gemma-2b", 8, 1});
  if (preset == "gemma-7b" || preset == "all") heads.push_back({"gemma-7b", 16, 16});
  if (heads.empty()) {
    std::fprintf(stderr, "unknown preset %s\n", preset.c_str());
    return 2;
  }
  try {
    QUILT_REQUIRE(cuda_device_count() > 0, "bench_cuda_prefill: no CUDA device visible");
    auto be = make_backend("cuda");  // bf16
    const std::string gpu = cuda_device_name(*be);
    if (peak < 0) peak = peak_for(gpu);
    std::printf("bench_cuda_prefill on %s: bf16 dense peak %.0f TFLOP/s%s; head_dim %d, block size %d\n", gpu.c_str(),
                peak, peak > 0 ? "" : " (unknown: pass --peak-tflops)", kD, kBs);
    std::mt19937 rng(7);
    std::printf("%-9s %6s | %9s %8s %7s | %9s %8s | %7s %10s\n", "model", "T", "new ms", "TFLOP/s", "of peak",
                "old ms", "TFLOP/s", "speedup", "|new-old|");
    for (const Heads& h : heads) {
      for (int T : tokens) {
        Batch b = make_batch(*be, h, {{T, T}}, rng, 1000 + T);
        const double flops = 4.0 * T * static_cast<double>(T) / 2 * kD * h.hq;
        AttentionParams ap_new = params(h, b, true), ap_old = params(h, b, false);
        const double t_new = time_ms(*be, reps, 20.0, [&] {
          be->paged_attention(b.out, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_new);
        });
        const double tf_new = flops / (t_new * 1e-3) / 1e12;
        double t_old = 0, diff = -1;
        if (old) {
          t_old = time_ms(*be, std::min(reps, 3), 20.0, [&] {
            be->paged_attention(b.out, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_old);
          });
          if (T <= 2048) {
            Tensor o_old = be->empty(b.out.shape(), DType::bf16);
            be->paged_attention(o_old, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_old);
            be->paged_attention(b.out, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_new);
            diff = max_rel_diff(*be, b.out, o_old);
          }
        }
        char ratio[16] = "n/a";
        if (peak > 0) std::snprintf(ratio, sizeof ratio, "%.1f%%", 100.0 * tf_new / peak);
        std::printf("%-9s %6d | %9.3f %8.1f %7s | ", h.name, T, t_new, tf_new, ratio);
        if (old)
          std::printf("%9.3f %8.1f | %6.1fx ", t_old, flops / (t_old * 1e-3) / 1e12, t_old / t_new);
        else
          std::printf("%9s %8s | %7s ", "-", "-", "-");
        if (diff >= 0) std::printf("%10.3g\n", diff);
        else std::printf("%10s\n", "-");
      }
    }
    if (sweep) {
      std::printf("\nthreshold sweep: 4 sequences of context 2048, q_len new rows each (ms per call)\n");
      std::printf("%-9s %5s | %9s %9s | %s\n", "model", "q_len", "prefill", "decode", "faster");
      for (const Heads& h : heads) {
        int from = -1;
        for (int q : {1, 2, 4, 8, 12, 16, 24, 32, 48, 64}) {
          Batch b = make_batch(*be, h, {{2048, q}, {2048, q}, {2048, q}, {2048, q}}, rng, 5000 + q);
          AttentionParams ap_new = params(h, b, true), ap_old = params(h, b, false);
          CudaKernelOptions force{};
          force.prefill_min_rows = 1;
          cuda_set_kernel_options(*be, force);
          const double t_new = time_ms(*be, reps, 10.0, [&] {
            be->paged_attention(b.out, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_new);
          });
          cuda_set_kernel_options(*be, CudaKernelOptions{});
          const double t_old = time_ms(*be, reps, 10.0, [&] {
            be->paged_attention(b.out, b.qkv, b.k, b.v, b.cu_d, b.lens_d, b.tables_d, ap_old);
          });
          if (t_new <= t_old && from < 0) from = q;
          if (t_new > t_old) from = -1;
          std::printf("%-9s %5d | %9.4f %9.4f | %s\n", h.name, q, t_new, t_old, t_new <= t_old ? "prefill" : "decode");
        }
        std::printf("%-9s prefill kernel faster from q_len %d on (default threshold %d)\n", h.name, from,
                    CudaKernelOptions{}.prefill_min_rows);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_prefill: %s\n", e.what());
    return 1;
  }
  return 0;
}
