#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/safetensors.h"
#include "runtime/core/check.h"

namespace fs = std::filesystem;
using quilt::Checkpoint;
using quilt::DType;
using quilt::SafetensorsFile;

namespace {

struct Entry {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::vector<uint8_t> serialize(const std::vector<Entry>& entries, const nlohmann::json* header_override = nullptr) {
  nlohmann::json h = nlohmann::json::object();
  h["__metadata__"] = {{"format", "pt"}};
  std::vector<uint8_t> data;
  for (const auto& e : entries) {
    h[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {data.size(), data.size() + e.bytes.size()}}};
    data.insert(data.end(), e.bytes.begin(), e.bytes.end());
  }
  std::string hs = header_override ? header_override->dump() : h.dump();
  while (hs.size() % 8) hs += ' ';
  std::vector<uint8_t> out;
  out.reserve(8 + hs.size() + data.size());
  out.resize(8);
  uint64_t n = hs.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), hs.begin(), hs.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

template <typename T>
std::vector<uint8_t> raw(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("quilt_st_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  fs::path file(const std::string& name, const std::vector<uint8_t>& bytes) const {
    std::ofstream(path_ / name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return path_ / name;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
  static inline int counter_ = 0;
};

std::vector<Entry> sample_entries() {
  // 1.0, -2.5 in f16 = 0x3c00, 0xc100; 0.5, 3.0 in bf16 = 0x3f00, 0x4040.
  return {{"a.f32", "F32", {2, 3}, raw(std::vector<float>{1, 2, 3, 4, 5, 6})},
          {"b.f16", "F16", {2}, raw(std::vector<uint16_t>{0x3c00, 0xc100})},
          {"c.bf16", "BF16", {1, 2}, raw(std::vector<uint16_t>{0x3f00, 0x4040})}};
}

std::string open_error(const fs::path& p) {
  try {
    SafetensorsFile::open(p.string());
  } catch (const quilt::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Safetensors, ReadsValidFileInEveryDtype) {
  TempDir d;
  auto f = SafetensorsFile::open(d.file("m.safetensors", serialize(sample_entries())).string());
  ASSERT_EQ(f->tensors().size(), 3u);
  const auto* a = f->find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::f32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> out(6);
  quilt::convert_to_f32(out.data(), a->data, a->dtype, 6);
  EXPECT_EQ(out, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  const auto* b = f->find("b.f16");
  quilt::convert_to_f32(out.data(), b->data, b->dtype, 2);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.5f);
  const auto* c = f->find("c.bf16");
  quilt::convert_to_f32(out.data(), c->data, c->dtype, 2);
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], 3.0f);
  EXPECT_EQ(f->find("missing"), nullptr);
}

TEST(Safetensors, EveryTruncationIsAClearError) {
  TempDir d;
  const auto full = serialize(sample_entries());
  for (size_t n = 0; n < full.size(); ++n) {
    const auto p = d.file("t.safetensors", std::vector<uint8_t>(full.begin(), full.begin() + n));
    const std::string err = open_error(p);
    EXPECT_FALSE(err.empty()) << "truncated to " << n << " bytes was accepted";
    EXPECT_NE(err.find("t.safetensors"), std::string::npos) << err;
  }
}

TEST(Safetensors, CorruptHeadersAreClearErrors) {
  TempDir d;
  using nlohmann::json;
  struct Case { json header; std::string must_say; };
  const std::vector<Case> cases = {
      {json{{"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 8}}}}}, "do not match shape"},
      {json{{"x", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {8, 0}}}}}, "reversed"},
      {json{{"x", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 1000}}}}}, "truncated"},
      {json{{"x", {{"dtype", "F64"}, {"shape", {1}}, {"data_offsets", {0, 8}}}}}, "F64"},
      {json{{"x", {{"dtype", "F32"}, {"shape", {-1}}, {"data_offsets", {0, 8}}}}}, "non-negative"},
      {json{{"x", {{"dtype", "F32"}, {"shape", {2}}}}}, "data_offsets"},
      {json{{"x", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
            {"y", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {4, 8}}}}}, "overlap"},
      {json::array({1, 2}), "not a JSON object"},
  };
  const std::vector<Entry> data{{"x", "F32", {2}, raw(std::vector<float>{1, 2})}};
  for (const auto& c : cases) {
    const auto p = d.file("c.safetensors", serialize(data, &c.header));
    const std::string err = open_error(p);
    EXPECT_NE(err.find(c.must_say), std::string::npos) << "error '" << err << "' for " << c.header.dump();
  }
  // A header length far past the end of the file, and a header that is not JSON.
  std::vector<uint8_t> bad = serialize(data);
  bad[5] = 0x7f;
  EXPECT_NE(open_error(d.file("len.safetensors", bad)).find("header length"), std::string::npos);
  bad = serialize(data);
  bad[8] = '!';
  EXPECT_NE(open_error(d.file("json.safetensors", bad)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(open_error(d.path() / "absent.safetensors").find("cannot open"), std::string::npos);
}

TEST(Safetensors, RandomHeaderCorruptionNeverCrashes) {
  TempDir d;
  const auto full = serialize(sample_entries());
  std::mt19937 rng(7);
  int rejected = 0;
  for (int i = 0; i < 300; ++i) {
    auto b = full;
    const size_t at = 8 + rng() % (full.size() - 8 - 16);
    b[at] = static_cast<uint8_t>(rng());
    const auto p = d.file("r.safetensors", b);
    try {
      auto f = SafetensorsFile::open(p.string());
      // Whatever was accepted must be readable in full and inside the file.
      size_t total = 0;
      for (const auto& [name, t] : f->tensors()) {
        ASSERT_EQ(t.bytes, static_cast<size_t>(t.numel()) * quilt::dtype_size(t.dtype));
        unsigned sum = 0;
        for (size_t k = 0; k < t.bytes; ++k) sum += t.data[k];
        (void)sum;
        total += t.bytes;
      }
      ASSERT_LE(total, f->file_size());
    } catch (const quilt::Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
}

TEST(Safetensors, ShardedCheckpointWithIndex) {
  TempDir d;
  d.file("model-00001-of-00002.safetensors", serialize({{"w1", "F32", {2}, raw(std::vector<float>{1, 2})}}));
  d.file("model-00002-of-00002.safetensors", serialize({{"w2", "BF16", {1}, raw(std::vector<uint16_t>{0x3f80})}}));
  nlohmann::json idx = {{"metadata", {{"total_size", 10}}},
                        {"weight_map", {{"w1", "model-00001-of-00002.safetensors"},
                                        {"w2", "model-00002-of-00002.safetensors"}}}};
  const std::string s = idx.dump();
  d.file("model.safetensors.index.json", std::vector<uint8_t>(s.begin(), s.end()));
  const Checkpoint c = Checkpoint::open(d.path().string());
  EXPECT_EQ(c.num_files(), 2u);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"w1", "w2"}));
  EXPECT_EQ(c.total_bytes(), 10u);
  EXPECT_EQ(c.get("w2").dtype, DType::bf16);
  try {
    c.get("w3");
    FAIL();
  } catch (const quilt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("w3"), std::string::npos);
  }
}

TEST(Safetensors, IndexNamingAMissingTensorOrShard) {
  TempDir d;
  d.file("a.safetensors", serialize({{"w1", "F32", {1}, raw(std::vector<float>{1})}}));
  auto write_index = [&](const nlohmann::json& map) {
    const std::string s = nlohmann::json{{"weight_map", map}}.dump();
    d.file("model.safetensors.index.json", std::vector<uint8_t>(s.begin(), s.end()));
  };
  auto err = [&] {
    try {
      Checkpoint::open(d.path().string());
    } catch (const quilt::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  write_index({{"w9", "a.safetensors"}});
  EXPECT_NE(err().find("w9"), std::string::npos);
  write_index({{"w1", "b.safetensors"}});
  EXPECT_NE(err().find("b.safetensors"), std::string::npos);
  write_index({{"w1", "../a.safetensors"}});
  EXPECT_NE(err().find("plain file name"), std::string::npos);
  fs::remove(d.path() / "model.safetensors.index.json");
  EXPECT_NE(err().find("neither model.safetensors"), std::string::npos);
}

TEST(Dtype, HalfConversions) {
  EXPECT_EQ(quilt::f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(quilt::f16_to_f32(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(quilt::f16_to_f32(0x7c00)));
  EXPECT_EQ(quilt::f16_to_f32(0x8000), -0.0f);
  EXPECT_EQ(quilt::bf16_to_f32(0xbf80), -1.0f);
  EXPECT_EQ(quilt::f32_to_bf16(1.00390625f), 0x3f80);  // ties to even
  EXPECT_EQ(quilt::f32_to_bf16(3.0f), 0x4040);
}
