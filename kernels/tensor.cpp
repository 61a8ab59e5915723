#include "quilt/kernels/tensor.h"

#include <sstream>

#include "runtime/core/check.h"

namespace quilt {

Tensor Tensor::view(std::vector<int64_t> shape) const {
  Tensor t(storage_, data_, dtype_, device_, std::move(shape));
  QUILT_ASSERT(t.numel() == numel(), "view ", t.describe(), " of ", describe());
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  QUILT_ASSERT(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0]);
  std::vector<int64_t> s = shape_;
  s[0] = end - begin;
  const int64_t row = shape_[0] == 0 ? 0 : numel() / shape_[0];
  auto* p = static_cast<char*>(data_) + begin * row * static_cast<int64_t>(dtype_size(dtype_));
  return Tensor(storage_, p, dtype_, device_, std::move(s));
}

std::string Tensor::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype_) << "[";
  for (size_t i = 0; i < shape_.size(); ++i) os << (i ? ", " : "") << shape_[i];
  os << "]";
  return os.str();
}

}  // namespace quilt
