#include "runtime/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include "kernels/cuda/cuda_backend.h"
#include "runtime/core/check.h"

namespace quilt {
namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) QUILT_FAIL("NCCL ", what, ": ", ncclGetErrorString(r), " (", ncclGetLastError(nullptr), ")");
}
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) QUILT_FAIL("NCCL communicator: ", what, ": ", cudaGetErrorString(e));
}

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
  }
  QUILT_FAIL("NCCL communicator: no NCCL type for ", dtype_name(dt));
}

}  // namespace

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = 0;
};

NcclCommunicator::NcclCommunicator(Backend& backend, MPI_Comm comm) : impl_(std::make_unique<Impl>()) {
  QUILT_REQUIRE(backend.device() == Device::cuda, "the NCCL communicator needs the cuda backend, not '",
                backend.name(), "'");
  MPI_Comm_rank(comm, &rank_);
  MPI_Comm_size(comm, &size_);
  impl_->stream = static_cast<cudaStream_t>(cuda_native_stream(backend));
  impl_->device = cuda_device_ordinal(backend);
  ncclUniqueId id{};
  if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm);
  check_cuda(cudaSetDevice(impl_->device), "cudaSetDevice");
  check_nccl(ncclCommInitRank(&impl_->comm, size_, id, rank_), "ncclCommInitRank");
}

NcclCommunicator::~NcclCommunicator() {
  if (!impl_->comm) return;
  cudaSetDevice(impl_->device);
  cudaStreamSynchronize(impl_->stream);  // no collective of ours may still be in flight
  ncclCommDestroy(impl_->comm);
}

void NcclCommunicator::all_reduce_sum(Tensor& x) {
  if (size_ == 1 || x.numel() == 0) return;
  QUILT_REQUIRE(x.device() == Device::cuda, "NCCL all-reduce needs a GPU tensor, got ", x.describe());
  check_cuda(cudaSetDevice(impl_->device), "cudaSetDevice");
  check_nccl(ncclAllReduce(x.data(), x.data(), static_cast<size_t>(x.numel()), nccl_type(x.dtype()), ncclSum,
                           impl_->comm, impl_->stream),
             "all-reduce");
}

void NcclCommunicator::all_gather(Tensor& out, const Tensor& in) {
  QUILT_REQUIRE(in.device() == Device::cuda && out.device() == Device::cuda && in.dtype() == out.dtype(),
                "NCCL all-gather needs GPU tensors of one dtype, got ", in.describe(), " -> ", out.describe());
  QUILT_ASSERT(out.numel() == in.numel() * size_);
  if (in.numel() == 0) return;
  check_cuda(cudaSetDevice(impl_->device), "cudaSetDevice");
  check_nccl(ncclAllGather(in.data(), out.data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()),
                           impl_->comm, impl_->stream),
             "all-gather");
}

}  // namespace quilt
