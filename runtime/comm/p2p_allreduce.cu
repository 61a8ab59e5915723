#include "runtime/comm/p2p_allreduce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "runtime/core/check.h"

namespace quilt {
namespace {

constexpr int kThreads = 512;   // threads per block (a multiple of 32, >= kMaxRanks)
constexpr int kMaxBlocks = 64;  // all blocks of every rank are resident at once (H100: 132 SMs)
constexpr int kMaxRanks = P2pAllReduce::kMaxRanks;

// The start of every rank's region. Peers write `flags`; `epoch` and `done` are this rank's own.
struct Header {
  // flags[b][p]: the latest epoch whose data block b of rank p has published into its own slot.
  unsigned long long flags[kMaxBlocks][kMaxRanks];
  unsigned long long epoch;  // calls completed (the next call is epoch + 1)
  unsigned int done;         // blocks of the current call that have finished (0 between calls)
};
constexpr size_t kDataOffset = (sizeof(Header) + 255) / 256 * 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) QUILT_FAIL("one-shot all-reduce: ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// ---- device side -----------------------------------------------------------------------------

struct Args {
  char* base[kMaxRanks];  // every rank's region, mapped into this process
  char* self;             // base[rank] (indexed statically: no local-memory copy of base)
  void* x;                // the tensor, reduced in place
  long long n;            // elements
  unsigned long long slot_bytes;
  int rank;
};

// Element codecs: storage bits <-> fp32 (round to nearest even on the way back).
struct F32 {
  using Bits = unsigned int;
  static __device__ __forceinline__ float to_f(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_f(float f) { return __float_as_uint(f); }
};
struct Bf16 {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_f(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ Bits from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
struct F16 {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_f(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// The unit of work: 16 bytes of elements. Slots are 256-byte aligned, so slots are always read and
// written a pack at a time; the tensor only when it is 16-byte aligned (else element by element).
template <typename Bits>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(Bits);
  Bits v[N];
};

// Peers' slots are read with ld.global.cg (L2, never a stale L1 line from an earlier call).
template <typename Bits>
__device__ __forceinline__ Pack<Bits> load_cg(const Pack<Bits>* p) {
  const uint4 r = __ldcg(reinterpret_cast<const uint4*>(p));
  Pack<Bits> out;
  memcpy(&out, &r, 16);
  return out;
}
template <typename Bits>
__device__ __forceinline__ Bits load_cg(const Bits* p) {
  if constexpr (sizeof(Bits) == 4) {
    return __ldcg(reinterpret_cast<const unsigned int*>(p));
  } else {
    static_assert(sizeof(Bits) == 2, "2- or 4-byte elements");
    return __ldcg(reinterpret_cast<const unsigned short*>(p));
  }
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// One call. Work is split in packs of 16 bytes of elements (the last one partial when n is not a
// multiple): block b handles packs b*T + t, b*T + t + G*T, ... (T threads, G blocks), so block b of
// every rank handles the same elements in both phases, whatever the tensor's alignment on each rank.
template <typename Dt, bool kAligned, int P>
__global__ void __launch_bounds__(kThreads) one_shot_all_reduce(Args a) {
  using Bits = typename Dt::Bits;
  using Pk = Pack<Bits>;
  constexpr int N = Pk::N;
  Header* self = reinterpret_cast<Header*>(a.self);
  __shared__ unsigned long long s_epoch;
  if (threadIdx.x == 0) s_epoch = *reinterpret_cast<volatile unsigned long long*>(&self->epoch) + 1;
  __syncthreads();
  const unsigned long long e = s_epoch;
  const size_t data = kDataOffset + static_cast<size_t>(e & 1) * a.slot_bytes;
  Bits* x = static_cast<Bits*>(a.x);
  Bits* mine = reinterpret_cast<Bits*>(a.self + data);
  const long long n = a.n, packs = (n + N - 1) / N;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;

  // 1. Publish this rank's values in its own slot e % 2.
  for (long long i = first; i < packs; i += stride) {
    const long long e0 = i * N;
    if (e0 + N <= n) {
      Pk v;
      if constexpr (kAligned) {
        v = reinterpret_cast<const Pk*>(x)[i];
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) v.v[j] = x[e0 + j];
      }
      reinterpret_cast<Pk*>(mine)[i] = v;
    } else {
      for (long long k = e0; k < n; ++k) mine[k] = x[k];
    }
  }

  // 2. Barrier of block b across ranks: thread p tells rank p that this block's data is in place
  //    (the release covers the whole block's stores, ordered before it by __syncthreads), then
  //    waits until rank p's block b says the same for epoch e (or later: see the header).
  __syncthreads();
  if (threadIdx.x < P) {
    char* peer_base = nullptr;
#pragma unroll
    for (int p = 0; p < P; ++p)
      if (threadIdx.x == p) peer_base = a.base[p];
    Header* peer = reinterpret_cast<Header*>(peer_base);
    st_release_sys(&peer->flags[blockIdx.x][a.rank], e);
    while (ld_acquire_sys(&self->flags[blockIdx.x][threadIdx.x]) < e) {
    }
  }
  __syncthreads();

  // 3. Sum the P slots in rank order, in fp32, into the tensor.
  const char* src[P];
#pragma unroll
  for (int p = 0; p < P; ++p) src[p] = a.base[p] + data;
  for (long long i = first; i < packs; i += stride) {
    const long long e0 = i * N;
    if (e0 + N <= n) {
      Pk v[P];
#pragma unroll
      for (int p = 0; p < P; ++p) v[p] = load_cg(reinterpret_cast<const Pk*>(src[p]) + i);
      Pk out;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float acc = Dt::to_f(v[0].v[j]);
#pragma unroll
        for (int p = 1; p < P; ++p) acc += Dt::to_f(v[p].v[j]);
        out.v[j] = Dt::from_f(acc);
      }
      if constexpr (kAligned) {
        reinterpret_cast<Pk*>(x)[i] = out;
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) x[e0 + j] = out.v[j];
      }
    } else {
      for (long long k = e0; k < n; ++k) {
        float acc = Dt::to_f(load_cg(reinterpret_cast<const Bits*>(src[0]) + k));
#pragma unroll
        for (int p = 1; p < P; ++p) acc += Dt::to_f(load_cg(reinterpret_cast<const Bits*>(src[p]) + k));
        x[k] = Dt::from_f(acc);
      }
    }
  }

  // 4. The last block to finish advances the epoch (every block has read it by then).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&self->done, 1u) == gridDim.x - 1) {
      *reinterpret_cast<volatile unsigned int*>(&self->done) = 0;
      *reinterpret_cast<volatile unsigned long long*>(&self->epoch) = e;
    }
  }
}

template <typename Dt, bool kAligned>
void launch_n(int ranks, int blocks, cudaStream_t s, const Args& a) {
  switch (ranks) {
    case 2: one_shot_all_reduce<Dt, kAligned, 2><<<blocks, kThreads, 0, s>>>(a); return;
    case 3: one_shot_all_reduce<Dt, kAligned, 3><<<blocks, kThreads, 0, s>>>(a); return;
    case 4: one_shot_all_reduce<Dt, kAligned, 4><<<blocks, kThreads, 0, s>>>(a); return;
    case 5: one_shot_all_reduce<Dt, kAligned, 5><<<blocks, kThreads, 0, s>>>(a); return;
    case 6: one_shot_all_reduce<Dt, kAligned, 6><<<blocks, kThreads, 0, s>>>(a); return;
    case 7: one_shot_all_reduce<Dt, kAligned, 7><<<blocks, kThreads, 0, s>>>(a); return;
    case 8: one_shot_all_reduce<Dt, kAligned, 8><<<blocks, kThreads, 0, s>>>(a); return;
  }
  QUILT_ASSERT(false, "one-shot all-reduce: ", ranks, " ranks");
}

template <typename Dt>
void launch(bool aligned, int ranks, int blocks, cudaStream_t s, const Args& a) {
  if (aligned) launch_n<Dt, true>(ranks, blocks, s, a);
  else launch_n<Dt, false>(ranks, blocks, s, a);
}

// ---- host side -------------------------------------------------------------------------------

// Whether every rank says yes (a collective over comm).
bool all_ranks(bool ok, MPI_Comm comm) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, comm);
  return all == 1;
}

std::string cuda_error(cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

}  // namespace

size_t p2p_allreduce_default_max_bytes(int ranks) {
  if (ranks <= 2) return size_t{1} << 20;
  if (ranks <= 4) return size_t{512} << 10;
  return size_t{256} << 10;
}

std::unique_ptr<P2pAllReduce> P2pAllReduce::create(int device, void* stream, MPI_Comm comm, size_t max_bytes,
                                                   std::string* why_not) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  auto fail = [&](const std::string& why) -> std::unique_ptr<P2pAllReduce> {
    if (why_not) *why_not = why;
    return nullptr;
  };
  // Decisions every rank makes alike (same size, same max_bytes): no collective needed.
  if (size < 2) return fail("one rank");
  if (size > kMaxRanks) return fail(std::to_string(size) + " ranks (at most " + std::to_string(kMaxRanks) + ")");
  if (max_bytes == 0) return fail("threshold of 0 bytes");

  // 1. Every peer's GPU is on this host, visible here, not ours, and reachable (peer access).
  std::string why;
  char host[MPI_MAX_PROCESSOR_NAME] = {}, bus[32] = {};
  int host_len = 0;
  MPI_Get_processor_name(host, &host_len);
  check(cudaSetDevice(device), "cudaSetDevice");
  if (const cudaError_t e = cudaDeviceGetPCIBusId(bus, sizeof(bus), device); e != cudaSuccess)
    why = "cudaDeviceGetPCIBusId: " + cuda_error(e);
  std::vector<char> hosts(static_cast<size_t>(size) * MPI_MAX_PROCESSOR_NAME), buses(static_cast<size_t>(size) * 32);
  MPI_Allgather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, hosts.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR, comm);
  MPI_Allgather(bus, 32, MPI_CHAR, buses.data(), 32, MPI_CHAR, comm);
  for (int p = 0; p < size && why.empty(); ++p) {
    if (p == rank) continue;
    const std::string peer_host(&hosts[static_cast<size_t>(p) * MPI_MAX_PROCESSOR_NAME]);
    const std::string peer_bus(&buses[static_cast<size_t>(p) * 32]);
    int peer_dev = -1, can = 0;
    if (peer_host != host) {
      why = "rank " + std::to_string(p) + " runs on host " + peer_host + ", this rank on " + host;
    } else if (const cudaError_t e = cudaDeviceGetByPCIBusId(&peer_dev, peer_bus.c_str()); e != cudaSuccess) {
      why = "rank " + std::to_string(p) + "'s GPU (PCI " + peer_bus + ") is not visible to rank " +
            std::to_string(rank) + ": " + cuda_error(e);
    } else if (peer_dev == device) {
      why = "ranks " + std::to_string(rank) + " and " + std::to_string(p) + " share GPU " + std::to_string(device);
    } else if (const cudaError_t e = cudaDeviceCanAccessPeer(&can, device, peer_dev); e != cudaSuccess || !can) {
      why = "GPU " + std::to_string(device) + " (rank " + std::to_string(rank) + ") cannot access GPU " +
            std::to_string(peer_dev) + " (rank " + std::to_string(p) + ") as a peer" +
            (e != cudaSuccess ? ": " + cuda_error(e) : std::string());
    }
  }
  if (!all_ranks(why.empty(), comm)) return fail(why.empty() ? "another rank's GPU cannot reach its peers" : why);

  // 2. This rank's region, zeroed (flags 0, epoch 0) before any peer can see it, and its IPC handle.
  std::unique_ptr<P2pAllReduce> r(new P2pAllReduce());
  r->device_ = device;
  r->rank_ = rank;
  r->size_ = size;
  r->stream_ = stream;
  r->max_bytes_ = max_bytes;
  r->slot_bytes_ = (max_bytes + 255) / 256 * 256;
  const size_t total = kDataOffset + 2 * r->slot_bytes_;
  cudaIpcMemHandle_t handle{};
  if (const cudaError_t e = cudaMalloc(&r->own_, total); e != cudaSuccess) {
    r->own_ = nullptr;
    why = "cudaMalloc of " + std::to_string(total) + " bytes: " + cuda_error(e);
  } else if (const cudaError_t e2 = cudaMemset(r->own_, 0, total); e2 != cudaSuccess) {
    why = "cudaMemset: " + cuda_error(e2);
  } else if (const cudaError_t e3 = cudaDeviceSynchronize(); e3 != cudaSuccess) {
    why = "cudaDeviceSynchronize: " + cuda_error(e3);
  } else if (const cudaError_t e4 = cudaIpcGetMemHandle(&handle, r->own_); e4 != cudaSuccess) {
    why = "cudaIpcGetMemHandle: " + cuda_error(e4);
  }
  auto release = [&r]() {  // undo steps 2-3 on this rank, after a collective failure
    for (int p = 0; p < r->size_; ++p)
      if (p != r->rank_ && r->bases_[p]) cudaIpcCloseMemHandle(r->bases_[p]);
    if (r->own_) cudaFree(r->own_);
    r->own_ = nullptr;
    std::fill(std::begin(r->bases_), std::end(r->bases_), nullptr);
  };
  if (!all_ranks(why.empty(), comm)) {
    release();
    return fail(why.empty() ? "another rank could not allocate or export its buffer" : why);
  }

  // 3. Map every peer's region.
  std::vector<cudaIpcMemHandle_t> handles(static_cast<size_t>(size));
  MPI_Allgather(&handle, sizeof(handle), MPI_BYTE, handles.data(), sizeof(handle), MPI_BYTE, comm);
  r->bases_[rank] = r->own_;
  for (int p = 0; p < size && why.empty(); ++p) {
    if (p == rank) continue;
    void* ptr = nullptr;
    if (const cudaError_t e = cudaIpcOpenMemHandle(&ptr, handles[p], cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess)
      why = "cudaIpcOpenMemHandle of rank " + std::to_string(p) + "'s buffer: " + cuda_error(e);
    else r->bases_[p] = static_cast<char*>(ptr);
  }
  if (!all_ranks(why.empty(), comm)) {
    release();
    return fail(why.empty() ? "another rank could not map its peers' buffers" : why);
  }
  MPI_Comm_dup(comm, &r->comm_);
  return r;
}

P2pAllReduce::~P2pAllReduce() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));  // none of our kernels in flight
  // A peer may still be reading our slot in its last call: free it only once every rank got here
  // (a rank that never does, after an error, costs a leaked buffer rather than a hang).
  bool peers_done = false;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) {
    MPI_Request req;
    MPI_Ibarrier(comm_, &req);
    const auto t0 = std::chrono::steady_clock::now();
    int flag = 0;
    while (!flag && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)) {
      MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
      if (!flag) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (flag) {
      peers_done = true;
      MPI_Comm_free(&comm_);
    }
  }
  for (int p = 0; p < size_; ++p)
    if (p != rank_ && bases_[p]) cudaIpcCloseMemHandle(bases_[p]);
  if (peers_done && own_) cudaFree(own_);
}

bool P2pAllReduce::handles(const Tensor& x) const {
  return x.device() == Device::cuda && x.dtype() != DType::i32 && x.numel() > 0 && x.bytes() <= max_bytes_;
}

void P2pAllReduce::all_reduce_sum(Tensor& x) {
  QUILT_ASSERT(handles(x), "one-shot all-reduce of ", x.describe(), " (up to ", max_bytes_, " bytes)");
  Args a{};
  std::copy(std::begin(bases_), std::end(bases_), std::begin(a.base));
  a.x = x.data();
  a.n = x.numel();
  a.slot_bytes = slot_bytes_;
  a.self = own_;
  a.rank = rank_;
  // The grid depends only on n and the dtype (the same on every rank); the alignment only picks how
  // this rank reads and writes its tensor.
  const bool aligned = (reinterpret_cast<uintptr_t>(x.data()) & 15u) == 0;
  const long long per = 16 / static_cast<long long>(dtype_size(x.dtype()));
  const long long packs = (a.n + per - 1) / per;
  const int blocks = static_cast<int>(std::clamp<long long>((packs + kThreads - 1) / kThreads, 1, kMaxBlocks));
  const auto s = static_cast<cudaStream_t>(stream_);
  check(cudaSetDevice(device_), "cudaSetDevice");
  switch (x.dtype()) {
    case DType::f32: launch<F32>(aligned, size_, blocks, s, a); break;
    case DType::bf16: launch<Bf16>(aligned, size_, blocks, s, a); break;
    case DType::f16: launch<F16>(aligned, size_, blocks, s, a); break;
    case DType::i32:
    case DType::fp8_e4m3: QUILT_ASSERT(false, "one-shot all-reduce of ", dtype_name(x.dtype()));
  }
  check(cudaGetLastError(), "launch");
}

}  // namespace quilt
