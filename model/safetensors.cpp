#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/core/check.h"

namespace quilt {
namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

namespace {
constexpr uint64_t kMaxHeader = 100ull << 20;  // the safetensors format's own limit

DType parse_st_dtype(const std::string& s, const std::string& where) {
  if (s == "F32") return DType::f32;
  if (s == "F16") return DType::f16;
  if (s == "BF16") return DType::bf16;
  QUILT_FAIL(where, ": dtype \"", s, "\" is not supported (Quilt reads BF16, F16 and F32)");
}
}  // namespace

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  QUILT_REQUIRE(fd >= 0, "cannot open safetensors file '", path, "'");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    QUILT_FAIL("cannot stat '", path, "'");
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    QUILT_FAIL("'", path, "' is not a safetensors file: ", f->size_, " bytes, shorter than the 8-byte header length");
  }
  f->map_ = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    QUILT_FAIL("cannot mmap '", path, "'");
  }

  const auto* bytes = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  QUILT_REQUIRE(header_len >= 2 && header_len <= kMaxHeader, "'", path,
                "': corrupt safetensors header length ", header_len);
  QUILT_REQUIRE(8 + header_len <= f->size_, "'", path, "' is truncated: header says ", header_len,
                " bytes but the file has ", f->size_);
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const json::exception& e) {
    QUILT_FAIL("'", path, "': safetensors header is not valid JSON (", e.what(), ")");
  }
  QUILT_REQUIRE(header.is_object(), "'", path, "': safetensors header is not a JSON object");

  const uint8_t* data_base = bytes + 8 + header_len;
  const uint64_t data_size = f->size_ - 8 - header_len;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = "'" + path + "' tensor '" + it.key() + "'";
    const json& e = it.value();
    QUILT_REQUIRE(e.is_object() && e.contains("dtype") && e.contains("shape") &&
                      e.contains("data_offsets"),
                  where, ": header entry needs dtype, shape and data_offsets");
    QUILT_REQUIRE(e["dtype"].is_string(), where, ": dtype must be a string");
    TensorInfo t;
    t.name = it.key();
    t.file = path;
    t.dtype = parse_st_dtype(e["dtype"].get<std::string>(), where);
    QUILT_REQUIRE(e["shape"].is_array(), where, ": shape must be a list");
    uint64_t numel = 1;
    for (const auto& d : e["shape"]) {
      QUILT_REQUIRE(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                    where, ": shape entries must be non-negative integers");
      const uint64_t v = d.get<uint64_t>();
      QUILT_REQUIRE(v == 0 || numel <= std::numeric_limits<uint64_t>::max() / 16 / v, where,
                    ": shape overflows");
      numel *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const json& off = e["data_offsets"];
    QUILT_REQUIRE(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
                      off[1].is_number_unsigned(),
                  where, ": data_offsets must be two non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    QUILT_REQUIRE(b <= en, where, ": data_offsets [", b, ", ", en, "] are reversed");
    QUILT_REQUIRE(en <= data_size, where, ": data ends at byte ", en, " but the file holds only ",
                  data_size, " data bytes (truncated?)");
    QUILT_REQUIRE(en - b == numel * dtype_size(t.dtype), where, ": ", en - b,
                  " data bytes do not match shape ", t.shape_str(), " of ", dtype_name(t.dtype));
    t.data = data_base + b;
    t.bytes = en - b;
    if (t.bytes) ranges.emplace_back(b, en);
    f->tensors_.emplace(t.name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    QUILT_REQUIRE(ranges[i].first >= ranges[i - 1].second, "'", path,
                  "': tensors overlap in the data section (corrupt header)");
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  QUILT_REQUIRE(fs::is_directory(dir), "model folder '", dir, "' does not exist");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      QUILT_FAIL("'", index.string(), "' is not valid JSON (", e.what(), ")");
    }
    QUILT_REQUIRE(j.contains("weight_map") && j["weight_map"].is_object(), "'", index.string(),
                  "' has no weight_map object");
    std::map<std::string, std::shared_ptr<SafetensorsFile>> by_file;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      QUILT_REQUIRE(it.value().is_string(), "'", index.string(), "': weight_map entry '", it.key(),
                    "' must name a file");
      const std::string file = it.value().get<std::string>();
      QUILT_REQUIRE(file.find('/') == std::string::npos && file.find("..") == std::string::npos,
                    "'", index.string(), "': shard name '", file, "' must be a plain file name");
      auto& sf = by_file[file];
      if (!sf) {
        sf = SafetensorsFile::open((fs::path(dir) / file).string());
        c.files_.push_back(sf);
      }
      const TensorInfo* t = sf->find(it.key());
      QUILT_REQUIRE(t != nullptr, "'", index.string(), "' maps tensor '", it.key(), "' to '", file,
                    "', which does not contain it");
      c.index_[it.key()] = t;
    }
  } else {
    QUILT_REQUIRE(fs::exists(single), "model folder '", dir,
                  "' has neither model.safetensors nor model.safetensors.index.json");
    auto sf = std::shared_ptr<SafetensorsFile>(SafetensorsFile::open(single.string()));
    c.files_.push_back(sf);
    for (const auto& [name, t] : sf->tensors()) c.index_[name] = &t;
  }
  return c;
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const TensorInfo& Checkpoint::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  QUILT_REQUIRE(t != nullptr, "checkpoint '", dir_, "' has no tensor '", name, "'");
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : index_) out.push_back(n);
  return out;
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& [_, t] : index_) n += t->bytes;
  return n;
}

}  // namespace quilt
