#pragma once
// Collectives over NCCL for a tensor-parallel replica on GPUs (one GPU per rank). Compiled only
// with the CUDA backend. NCCL and CUDA types stay in the .cpp.
#include <mpi.h>

#include <memory>

#include "quilt/kernels/backend.h"
#include "runtime/comm/communicator.h"

namespace quilt {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm` (the replica's MPI communicator): rank 0 makes the NCCL unique id and
  // broadcasts it, then every rank joins on the device of `backend` (a CUDA backend, which
  // must outlive this communicator). Collectives run on the backend's compute stream, in order
  // with its ops, and do not synchronise the host.
  NcclCommunicator(Backend& backend, MPI_Comm comm);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // x: a GPU tensor of f32, bf16 or f16 (NCCL sums in the tensor's dtype).
  void all_reduce_sum(Tensor& x) override;
  // out: [size(), in...] on the GPU, rank-major, as NCCL's all-gather.
  void all_gather(Tensor& out, const Tensor& in) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
};

}  // namespace quilt
