#pragma once
// Collectives over NCCL for a tensor-parallel replica on GPUs (one GPU per rank). Compiled only
// with the CUDA backend. NCCL and CUDA types stay in the .cpp. Small all-reduces take the one-shot
// kernel over NVLink peer memory (p2p_allreduce.h) when every GPU of the replica can reach the others'.
#include <mpi.h>

#include <cstdint>
#include <memory>

#include "quilt/kernels/backend.h"
#include "runtime/comm/communicator.h"

namespace quilt {

struct NcclOptions {
  // All-reduces of at most this many bytes (f32, bf16, f16) take the one-shot kernel; larger ones
  // and all-gather take NCCL. -1: QUILT_ONE_SHOT_MAX_BYTES from the environment if set, else
  // p2p_allreduce_default_max_bytes(ranks); 0: NCCL only. The smallest value over the ranks wins.
  int64_t one_shot_max_bytes = -1;
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm` (the replica's MPI communicator): rank 0 makes the NCCL unique id and
  // broadcasts it, then every rank joins on the device of `backend` (a CUDA backend, which
  // must outlive this communicator). Collectives run on the backend's compute stream, in order
  // with its ops, and do not synchronise the host. Logs (info) whether the one-shot path is on, and
  // why not when peers cannot reach each other's memory.
  NcclCommunicator(Backend& backend, MPI_Comm comm, const NcclOptions& options = {});
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // x: a GPU tensor of f32, bf16 or f16. Up to one_shot_max_bytes(): the one-shot kernel (fp32
  // sums in rank order, bit-identical on every rank); above: NCCL (sums in the tensor's dtype).
  void all_reduce_sum(Tensor& x) override;
  // The one-shot threshold in bytes; 0 when every all-reduce takes NCCL.
  int64_t one_shot_max_bytes() const;
  // out: [size(), in...] on the GPU, rank-major, as NCCL's all-gather.
  void all_gather(Tensor& out, const Tensor& in) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
};

}  // namespace quilt
