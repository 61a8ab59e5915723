#pragma once
// One-shot all-reduce over NVLink peer memory (CUDA IPC) for decode-sized messages, where NCCL's
// ~11 us latency dominates (issue 5; KERNELS.md section 5). NcclCommunicator delegates small
// all-reduces here; larger ones and all-gather stay on NCCL. Plain C++ header: CUDA types stay in
// p2p_allreduce.cu.
//
// Each rank cudaMallocs one region: per-block flags that peers write, a local epoch and block
// counter, and two data slots of max_bytes. The regions are exchanged as IPC handles over the
// replica's MPI communicator, so every rank reads every peer's slots directly.
//
// A call is one kernel on the compute stream. Call number e (the epoch, kept in device memory
// and advanced by the kernel's last block, so a replayed CUDA graph gets a new epoch without any
// host involvement) uses data slot e % 2. Block b of every rank handles the same elements: it
// copies them from the tensor into its own slot, publishes e into flags[b][rank] of every peer
// (st.release.sys), waits until flags[b][p] >= e for every p (ld.acquire.sys), then sums the P
// slots in rank order 0..P-1 in fp32 and writes the result into the tensor in its dtype. Every
// rank adds the same values in the same order, so the result is bit-identical on every rank.
// A rank can only start call e+1 once every peer has started call e (so has finished e-1), and
// call e+1 writes the other slot: no rank ever overwrites a slot a peer may still be reading.
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "quilt/kernels/tensor.h"

namespace quilt {

class P2pAllReduce {
 public:
  // The largest rank count the kernel is compiled for.
  static constexpr int kMaxRanks = 8;

  // Collective over `comm` (every rank must call it, with the same max_bytes): each rank's GPU is
  // `device` and its calls run on `stream` (a cudaStream_t). Returns nullptr on every rank, with
  // the reason in *why_not, when one-shot cannot run: one rank, more than kMaxRanks ranks, ranks
  // on different hosts or sharing a GPU, a peer's GPU not visible here, or no peer access
  // between two of the GPUs (cudaDeviceCanAccessPeer).
  static std::unique_ptr<P2pAllReduce> create(int device, void* stream, MPI_Comm comm, size_t max_bytes,
                                              std::string* why_not);
  // Waits for this rank's calls (and, for a few seconds at most, for the peers to get here too)
  // before unmapping the peers' regions and freeing its own.
  ~P2pAllReduce();
  P2pAllReduce(const P2pAllReduce&) = delete;
  P2pAllReduce& operator=(const P2pAllReduce&) = delete;

  size_t max_bytes() const { return max_bytes_; }
  int size() const { return size_; }
  // Whether all_reduce_sum takes x: a GPU tensor of f32, bf16 or f16 of 1 .. max_bytes() bytes.
  bool handles(const Tensor& x) const;
  // x = sum over ranks of x, in place, on the stream; no host synchronisation, no allocation,
  // no host-side state change (CUDA-graph capturable). Every rank must make the same calls.
  void all_reduce_sum(Tensor& x);

 private:
  P2pAllReduce() = default;
  int device_ = 0, rank_ = 0, size_ = 1;
  void* stream_ = nullptr;
  MPI_Comm comm_ = MPI_COMM_NULL;  // a duplicate of the replica's communicator
  size_t max_bytes_ = 0;
  size_t slot_bytes_ = 0;  // max_bytes_ rounded up to 256
  char* own_ = nullptr;    // this rank's region (cudaMalloc)
  char* bases_[kMaxRanks] = {};  // every rank's region in this process (own_ at rank_)
};

// The default threshold for `ranks` ranks (one-shot reads (P-1) x bytes per rank, so it pays for
// itself on smaller messages as P grows); launch/experiments/bench_allreduce.cpp measures it.
size_t p2p_allreduce_default_max_bytes(int ranks);

}  // namespace quilt
