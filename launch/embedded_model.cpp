#include "launch/embedded_model.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "runtime/core/check.h"

namespace quilt {

std::string materialize_embedded_model() {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("quilt-embedded-model-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  for (const auto& f : embedded_model_files()) {
    std::ofstream out(dir / f.name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(f.data), static_cast<std::streamsize>(f.size));
    QUILT_REQUIRE(out.good(), "cannot write the embedded model to '", (dir / f.name).string(), "'");
  }
  return dir.string();
}

}  // namespace quilt
