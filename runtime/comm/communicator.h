#pragma once
// The collectives a tensor-parallel replica needs. MPI now (CPU tensors); NCCL joins in the
// CUDA issue. Every rank of the replica must make the same calls in the same order.
#include <cstring>

#include "quilt/kernels/tensor.h"

namespace quilt {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // x = sum over ranks of x, in place.
  virtual void all_reduce_sum(Tensor& x) = 0;
  // out[r] = in on rank r: out has shape [size(), in...].
  virtual void all_gather(Tensor& out, const Tensor& in) = 0;
};

// A replica of one rank: every collective is the identity.
class SoloCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(Tensor&) override {}
  void all_gather(Tensor& out, const Tensor& in) override {
    if (in.numel()) std::memcpy(out.data(), in.data(), in.bytes());
  }
};

}  // namespace quilt
