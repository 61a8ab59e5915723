#pragma once
// Files compiled into `quilt`: the tokenizer of the tiny default model (launch/init_model.h).
#include <cstddef>
#include <string>
#include <vector>

namespace quilt {

struct EmbeddedFile {
  const char* name;
  const unsigned char* data;
  size_t size;
};

const std::vector<EmbeddedFile>& embedded_model_files();

}  // namespace quilt
