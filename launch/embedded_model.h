#pragma once
// The tiny random Gemma checkpoint compiled into `quilt`, served when no model is configured so
// that the serve command works on a fresh machine. Its outputs are meaningless text; it exists
// to try the API, not to answer questions.
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

// Writes the embedded checkpoint into a fresh folder under the system's temp dir and returns it.
std::string materialize_embedded_model();

}  // namespace quilt
