#pragma once
#include <mpi.h>

#include "runtime/comm/communicator.h"

namespace quilt {

// Collectives over an MPI communicator (the replica's, from MPI_Comm_split), on host f32 data.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm);
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(Tensor& x) override;
  void all_gather(Tensor& out, const Tensor& in) override;

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace quilt
