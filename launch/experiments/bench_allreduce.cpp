// All-reduce latency at TP P (issue 5's decode goal: <= 8 us at TP2): the one-shot kernel over
// NVLink peer memory (runtime/comm/p2p_allreduce.h) against NCCL, bf16 (or --dtype) messages from
// 4 KB to 1 MB, on the backend's compute stream as the model runs them. Run under mpirun -np P,
// one GPU per rank:
//
//   mpirun -np 2 bench_allreduce [--iters 200] [--reps 7] [--nvlink-gbs 450] [--dtype bf16]
//
// Each figure is the slowest rank's median over --reps repetitions of --iters calls back to back:
//  - host: wall clock from before the first call to after cudaStreamSynchronize, / iters (what a
//    step sees when it launches eagerly, launch overhead included);
//  - gpu: CUDA events around the same calls, / iters;
//  - graph: CUDA events around a replayed CUDA graph of --iters calls, / iters (decode steps
//    replay graphs, so this is the figure a graph-captured step pays; "n/a" if capture failed).
// The bound is the message's bytes * (P-1)/P over the per-direction NVLink bandwidth (--nvlink-gbs,
// H100 SXM: 18 links x 25 GB/s = 450 GB/s), and ratio = one-shot gpu time / bound. The last
// lines give the largest size up to which the one-shot kernel beats NCCL at every size (gpu
// time), to set the threshold (NcclOptions::one_shot_max_bytes, QUILT_ONE_SHOT_MAX_BYTES).
#include <cuda_runtime.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/comm/nccl_communicator.h"
#include "runtime/comm/p2p_allreduce.h"
#include "runtime/core/check.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double slowest(double v) {
  double m = 0;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) QUILT_FAIL(what, ": ", cudaGetErrorString(e));
}

struct Times {
  double host_us = 0, gpu_us = 0, graph_us = -1;  // graph_us < 0: n/a
};

// Times `iters` all-reduces of x on comm (see the header). Collective.
Times time_calls(Backend& be, Communicator& comm, Tensor& x, int iters, int reps) {
  auto stream = static_cast<cudaStream_t>(cuda_native_stream(be));
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  for (int k = 0; k < 20; ++k) comm.all_reduce_sum(x);  // warm-up
  cuda_synchronize(be);
  std::vector<double> host, gpu, graph;
  for (int r = 0; r < reps; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = Clock::now();
    check(cudaEventRecord(a, stream), "cudaEventRecord");
    for (int k = 0; k < iters; ++k) comm.all_reduce_sum(x);
    check(cudaEventRecord(b, stream), "cudaEventRecord");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    host.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters);
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    gpu.push_back(ms * 1e3 / iters);
  }
  Times t{slowest(median(host)), slowest(median(gpu)), -1};
  // The same calls in one CUDA graph. Every rank must agree on whether capture worked.
  std::unique_ptr<BackendGraph> g;
  int ok = 1, all = 0;
  try {
    g = be.capture_graph([&]() {
      for (int k = 0; k < iters; ++k) comm.all_reduce_sum(x);
    });
  } catch (const std::exception& e) {
    ok = 0;
    std::fprintf(stderr, "[bench] graph capture failed: %s\n", e.what());
  }
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (all) {
    g->launch();  // warm-up
    cuda_synchronize(be);
    for (int r = 0; r < reps; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      check(cudaEventRecord(a, stream), "cudaEventRecord");
      g->launch();
      check(cudaEventRecord(b, stream), "cudaEventRecord");
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
      graph.push_back(ms * 1e3 / iters);
    }
    t.graph_us = slowest(median(graph));
  }
  g.reset();
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t;
}

std::string fmt_graph(double us) {
  char buf[32];
  if (us < 0) return "n/a";
  std::snprintf(buf, sizeof(buf), "%.2f us", us);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  int iters = 200, reps = 7;
  double nvlink_gbs = 450;
  std::string dtype = "bf16";
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (s == "--iters") iters = std::stoi(next());
    else if (s == "--reps") reps = std::stoi(next());
    else if (s == "--nvlink-gbs") nvlink_gbs = std::stod(next());
    else if (s == "--dtype") dtype = next();
    else {
      if (rank == 0)
        std::fprintf(stderr, "usage: mpirun -np P %s [--iters N] [--reps R] [--nvlink-gbs X] [--dtype bf16|f16|f32]\n",
                     argv[0]);
      MPI_Finalize();
      return 2;
    }
  }
  int rc = 0;
  try {
    QUILT_REQUIRE(P >= 2, "run under mpirun -np P with P >= 2 (one GPU per rank)");
    QUILT_REQUIRE(dtype == "bf16" || dtype == "f16" || dtype == "f32", "--dtype bf16|f16|f32, got ", dtype);
    const DType dt = dtype == "bf16" ? DType::bf16 : dtype == "f16" ? DType::f16 : DType::f32;
    const int gpus = cuda_device_count();
    QUILT_REQUIRE(gpus >= P, P, " ranks need ", P, " GPUs, ", gpus, " visible");
    auto be = make_backend("cuda", BackendOptions{std::nullopt, rank % gpus});
    const int64_t max_bytes = int64_t{1} << 20;
    NcclCommunicator one(*be, MPI_COMM_WORLD, NcclOptions{max_bytes});
    NcclCommunicator nccl(*be, MPI_COMM_WORLD, NcclOptions{0});
    const bool have_one = one.one_shot_max_bytes() > 0;
    const std::string gpu = cuda_device_name(*be);
    if (rank == 0) {
      std::printf("[bench] GPU %s x %d ranks, %s, %d calls back to back x %d reps (median, slowest rank)\n", gpu.c_str(), P,
                  dtype.c_str(), iters, reps);
      std::printf("[bench] NVLink bound: bytes * (P-1)/P / %.0f GB/s per direction (H100 SXM NV18 spec)\n", nvlink_gbs);
      std::printf("[bench] default one-shot threshold at %d ranks: %zu bytes%s\n", P, p2p_allreduce_default_max_bytes(P),
                  have_one ? "" : "; ONE-SHOT UNAVAILABLE here (see the log line above): NCCL only");
      std::printf("| GPU | P | bytes | one-shot host | one-shot gpu | one-shot graph | NCCL host | NCCL gpu | NCCL graph | "
                  "NVLink bound | one-shot gpu / bound | NCCL gpu / one-shot gpu |\n");
      std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    }
    const std::vector<int64_t> sizes = {4 << 10,   6 << 10,   8 << 10,   12 << 10,  16 << 10, 32 << 10,
                                        48 << 10,  64 << 10,  128 << 10, 256 << 10, 512 << 10, 1 << 20};
    int64_t beats_upto = 0;
    bool beaten = false;
    for (const int64_t bytes : sizes) {
      const int64_t n = bytes / static_cast<int64_t>(dtype_size(dt));
      Tensor x = be->zeros({n}, dt);
      Times o;
      if (have_one) o = time_calls(*be, one, x, iters, reps);
      const Times c = time_calls(*be, nccl, x, iters, reps);
      const double bound_us = static_cast<double>(bytes) * (P - 1) / P / (nvlink_gbs * 1e9) * 1e6;
      if (have_one && !beaten && o.gpu_us < c.gpu_us) beats_upto = bytes;
      else beaten = true;
      if (rank == 0) {
        if (have_one)
          std::printf("| %s | %d | %lld | %.2f us | %.2f us | %s | %.2f us | %.2f us | %s | %.4f us | %.0fx | %.2fx |\n",
                      gpu.c_str(), P, static_cast<long long>(bytes), o.host_us, o.gpu_us, fmt_graph(o.graph_us).c_str(),
                      c.host_us, c.gpu_us, fmt_graph(c.graph_us).c_str(), bound_us, o.gpu_us / bound_us,
                      c.gpu_us / o.gpu_us);
        else
          std::printf("| %s | %d | %lld | - | - | - | %.2f us | %.2f us | %s | %.4f us | - | - |\n", gpu.c_str(), P,
                      static_cast<long long>(bytes), c.host_us, c.gpu_us, fmt_graph(c.graph_us).c_str(), bound_us);
        std::fflush(stdout);
      }
    }
    if (rank == 0 && have_one)
      std::printf("[bench] one-shot beats NCCL (gpu time) at every size up to %lld bytes (P=%d); default threshold %zu\n",
                  static_cast<long long>(beats_upto), P, p2p_allreduce_default_max_bytes(P));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_allreduce (rank %d): %s\n", rank, e.what());
    rc = 1;
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
