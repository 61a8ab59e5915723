#pragma once
#include <memory>

#include "quilt/kernels/backend.h"

namespace quilt {
std::unique_ptr<Backend> make_cpu_backend();
}
