#pragma once
// The CUDA backend (plain C++ header: backend_factory.cpp and the tests include it).
#include <cstdint>
#include <memory>

#include "quilt/kernels/backend.h"

namespace quilt {
// Number of CUDA devices visible to this process (0 when the driver or a GPU is missing).
int cuda_device_count();
// compute_dtype: bf16 (default), f32 (exactness checks against the CPU) or f16.
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& options = {});

// Test and benchmark helpers for a backend made by make_cuda_backend (they throw otherwise).
// Waits until every op enqueued so far has finished.
void cuda_synchronize(Backend& backend);
// Fills t with N(0, stddev^2) values generated on the GPU from (seed, element index).
void cuda_fill_normal(Backend& backend, Tensor& t, uint64_t seed, float stddev);
}  // namespace quilt
