#pragma once
// A Tensor is a typed, shaped view of memory owned by a backend (host memory for the CPU
// backend, device memory for CUDA). Copies share the storage.
#include <cstdint>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "quilt/kernels/dtype.h"

namespace quilt {

enum class Device : uint8_t { cpu, cuda };

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<void> storage, void* data, DType dtype, Device device,
         std::vector<int64_t> shape)
      : storage_(std::move(storage)), data_(data), dtype_(dtype), device_(device),
        shape_(std::move(shape)) {}

  bool defined() const { return data_ != nullptr || numel() == 0; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int64_t numel() const {
    return std::accumulate(shape_.begin(), shape_.end(), int64_t{1}, std::multiplies<>());
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

  // Same storage, new shape with the same element count.
  Tensor view(std::vector<int64_t> shape) const;
  // Rows [begin, end) of the leading dimension.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  std::string describe() const;

 private:
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
  std::vector<int64_t> shape_;
};

}  // namespace quilt
