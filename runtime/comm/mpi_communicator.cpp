#include "runtime/comm/mpi_communicator.h"

#include <cstring>

#include "runtime/core/check.h"

namespace quilt {

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

void MpiCommunicator::all_reduce_sum(Tensor& x) {
  if (size_ == 1 || x.numel() == 0) return;
  QUILT_REQUIRE(x.device() == Device::cpu && x.dtype() == DType::f32,
                "tensor parallelism over MPI needs host f32 activations (the CPU backend), got ",
                x.describe(), "; GPU tensor parallelism needs the NCCL communicator");
  MPI_Allreduce(MPI_IN_PLACE, x.data(), static_cast<int>(x.numel()), MPI_FLOAT, MPI_SUM, comm_);
}

void MpiCommunicator::all_gather(Tensor& out, const Tensor& in) {
  QUILT_REQUIRE(in.device() == Device::cpu && in.dtype() == DType::f32,
                "MPI all-gather needs host f32 data, got ", in.describe());
  QUILT_ASSERT(out.numel() == in.numel() * size_);
  MPI_Allgather(in.data(), static_cast<int>(in.numel()), MPI_FLOAT, out.data(),
                static_cast<int>(in.numel()), MPI_FLOAT, comm_);
}

}  // namespace quilt
