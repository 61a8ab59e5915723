#include "tests/model/fixtures.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace quilt::testing {
namespace fs = std::filesystem;

std::vector<const GoldenCase*> Fixture::base_cases() const {
  std::vector<const GoldenCase*> out;
  for (const auto& c : cases)
    if (!c.adapter) out.push_back(&c);
  return out;
}

std::vector<Fixture> load_fixtures() {
  const char* env = std::getenv("QUILT_GOLDEN_DIR");
  const fs::path root = env ? fs::path(env) : fs::path(QUILT_SOURCE_DIR) / "tests/golden/fixtures";
  std::vector<Fixture> out;
  if (fs::is_directory(root)) {
    for (const auto& entry : fs::directory_iterator(root)) {
      const fs::path exp = entry.path() / "expected.json";
      if (!fs::exists(exp)) continue;
      std::ifstream in(exp);
      const auto j = nlohmann::json::parse(in);
      Fixture f;
      f.name = entry.path().filename().string();
      f.dir = entry.path().string();
      f.max_new_tokens = j.at("max_new_tokens").get<int>();
      for (const auto& c : j.at("cases")) {
        GoldenCase g;
        if (!c.at("adapter").is_null()) g.adapter = c.at("adapter").get<std::string>();
        g.prompt = c.at("prompt").get<std::string>();
        g.prompt_ids = c.at("prompt_ids").get<std::vector<int>>();
        for (const auto& v : c.at("prompt_logprobs"))
          g.prompt_logprobs.push_back(v.is_null() ? std::nullopt : std::optional<double>(v.get<double>()));
        g.greedy_ids = c.at("greedy_ids").get<std::vector<int>>();
        g.greedy_logprobs = c.at("greedy_logprobs").get<std::vector<double>>();
        if (c.contains("last_logits")) g.last_logits = c.at("last_logits").get<std::vector<double>>();
        f.cases.push_back(std::move(g));
      }
      out.push_back(std::move(f));
    }
  }
  std::sort(out.begin(), out.end(), [](const Fixture& a, const Fixture& b) { return a.name < b.name; });
  EXPECT_FALSE(out.empty()) << "no golden fixtures under " << root;
  return out;
}

}  // namespace quilt::testing
