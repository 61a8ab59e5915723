#pragma once
#include <mpi.h>

#include <memory>

#include "quilt/kernels/backend.h"
#include "runtime/comm/communicator.h"

namespace quilt {

// The communicator for a replica's ranks on `backend`'s device: NCCL on the GPU (one GPU per
// rank), MPI on the CPU; a SoloCommunicator when the replica is one rank. Collective: every rank
// of `comm` calls it.
std::unique_ptr<Communicator> make_communicator(Backend& backend, MPI_Comm comm);

}  // namespace quilt
