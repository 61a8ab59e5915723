#pragma once
#include <mpi.h>

#include <memory>

#include "runtime/transport/transport.h"

namespace quilt {

// The control plane over MPI point-to-point. One thread owns all of this transport's MPI
// calls; it duplicates `comm` (collectively, in the constructor) so that control messages never
// match a collective of the data plane. Needs MPI_THREAD_MULTIPLE when other threads also
// call MPI (the CPU backend's all-reduce runs on the worker's compute thread).
class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(MPI_Comm comm);
  ~MpiTransport() override;
  int rank() const override;
  int size() const override;
  void start(Receiver receiver) override;
  void send(int dst, Bytes bytes) override;
  void stop() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace quilt
