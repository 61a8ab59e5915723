#include "runtime/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_backend.h"
#include "runtime/comm/p2p_allreduce.h"
#include "runtime/core/check.h"
#include "runtime/core/log.h"

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
    case DType::fp8_e4m3: break;  // KV cache storage only: never reduced
  }
  QUILT_FAIL("NCCL communicator: no NCCL type for ", dtype_name(dt));
}

// NcclOptions::one_shot_max_bytes resolved on this rank (-1: environment, then the default).
int64_t one_shot_threshold(int64_t requested, int ranks) {
  if (requested >= 0) return requested;
  if (const char* env = std::getenv("QUILT_ONE_SHOT_MAX_BYTES"); env && *env) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    QUILT_REQUIRE(end && *end == 0 && v >= 0, "QUILT_ONE_SHOT_MAX_BYTES must be a byte count >= 0 (0: NCCL only), got '",
                  env, "'");
    return v;
  }
  return static_cast<int64_t>(p2p_allreduce_default_max_bytes(ranks));
}

}  // namespace

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = 0;
  std::unique_ptr<P2pAllReduce> one_shot;  // null: NCCL for every all-reduce
};

NcclCommunicator::NcclCommunicator(Backend& backend, MPI_Comm comm, const NcclOptions& options)
    : impl_(std::make_unique<Impl>()) {
  QUILT_REQUIRE(backend.device() == Device::cuda, "the NCCL communicator needs the cuda backend, not '",
                backend.name(), "'");
  MPI_Comm_rank(comm, &rank_);
  MPI_Comm_size(comm, &size_);
  impl_->stream = static_cast<cudaStream_t>(cuda_native_stream(backend));
  impl_->device = cuda_device_ordinal(backend);
  // The environment is read before NCCL starts: a bad value throws with nothing to clean up.
  const long long max_bytes = size_ > 1 ? one_shot_threshold(options.one_shot_max_bytes, size_) : 0;
  ncclUniqueId id{};
  if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm);
  check_cuda(cudaSetDevice(impl_->device), "cudaSetDevice");
  check_nccl(ncclCommInitRank(&impl_->comm, size_, id, rank_), "ncclCommInitRank");
  if (size_ > 1) {
    // Collective: every rank takes the same threshold (the smallest), then create() decides alike.
    long long agreed = 0;
    MPI_Allreduce(&max_bytes, &agreed, 1, MPI_LONG_LONG, MPI_MIN, comm);
    std::string why;
    impl_->one_shot = P2pAllReduce::create(impl_->device, impl_->stream, comm, static_cast<size_t>(agreed), &why);
    if (impl_->one_shot) {
      if (rank_ == 0)
        log::info("all-reduce: one-shot over NVLink peer memory up to ", agreed, " bytes, NCCL above (", size_,
                  " ranks)");
    } else if (agreed == 0) {
      if (rank_ == 0) log::info("all-reduce: NCCL only (one-shot threshold 0)");
    } else {
      log::info("all-reduce: NCCL only, the one-shot kernel cannot run: ", why);
    }
  }
}

NcclCommunicator::~NcclCommunicator() {
  impl_->one_shot.reset();  // waits for its kernels
  if (!impl_->comm) return;
  cudaSetDevice(impl_->device);
  cudaStreamSynchronize(impl_->stream);  // no collective of ours may still be in flight
  ncclCommDestroy(impl_->comm);
}

void NcclCommunicator::all_reduce_sum(Tensor& x) {
  if (size_ == 1 || x.numel() == 0) return;
  QUILT_REQUIRE(x.device() == Device::cuda, "NCCL all-reduce needs a GPU tensor, got ", x.describe());
  if (impl_->one_shot && impl_->one_shot->handles(x)) {
    impl_->one_shot->all_reduce_sum(x);
    return;
  }
  check_cuda(cudaSetDevice(impl_->device), "cudaSetDevice");
  check_nccl(ncclAllReduce(x.data(), x.data(), static_cast<size_t>(x.numel()), nccl_type(x.dtype()), ncclSum,
                           impl_->comm, impl_->stream),
             "all-reduce");
}

int64_t NcclCommunicator::one_shot_max_bytes() const {
  return impl_->one_shot ? static_cast<int64_t>(impl_->one_shot->max_bytes()) : 0;
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
