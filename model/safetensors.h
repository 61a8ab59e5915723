#pragma once
// Reads safetensors checkpoints through mmap: one file, or shards listed by
// model.safetensors.index.json. Every header field is validated before any tensor is touched,
// so a truncated or corrupt file is a clear quilt::Error, never a crash.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "quilt/kernels/dtype.h"

namespace quilt {

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapped file
  size_t bytes = 0;
  std::string file;  // for messages
  int64_t numel() const;
  std::string shape_str() const;
};

class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const std::string& path() const { return path_; }
  size_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

// A whole checkpoint folder: model.safetensors, or model.safetensors.index.json + shards.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);
  const TensorInfo& get(const std::string& name) const;  // throws naming the tensor
  const TensorInfo* find(const std::string& name) const;
  std::vector<std::string> names() const;
  size_t total_bytes() const;
  size_t num_files() const { return files_.size(); }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
  std::string dir_;
};

}  // namespace quilt
