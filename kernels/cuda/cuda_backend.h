#pragma once
#include <memory>

#include "quilt/kernels/backend.h"

namespace quilt {
// Number of CUDA devices visible to this process (0 when the driver or a GPU is missing).
int cuda_device_count();
std::unique_ptr<Backend> make_cuda_backend();
}  // namespace quilt
