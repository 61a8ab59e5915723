#include "runtime/comm/make_communicator.h"

#include "runtime/comm/mpi_communicator.h"
#include "runtime/core/check.h"
#if QUILT_HAVE_NCCL
#include "runtime/comm/nccl_communicator.h"
#endif

namespace quilt {

std::unique_ptr<Communicator> make_communicator(Backend& backend, MPI_Comm comm) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  if (size == 1) return std::make_unique<SoloCommunicator>();
  if (backend.device() == Device::cuda) {
#if QUILT_HAVE_NCCL
    return std::make_unique<NcclCommunicator>(backend, comm);
#else
    QUILT_FAIL("tensor parallelism on the GPU needs NCCL, and this build has none");
#endif
  }
  return std::make_unique<MpiCommunicator>(comm);
}

}  // namespace quilt
