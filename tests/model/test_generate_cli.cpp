// `quilt generate --json` under mpiexec -np 1 and -np 2 reproduces the golden fixtures.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tests/model/fixtures.h"

namespace {
struct CmdResult {
  int status;
  std::string out;
};

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

CmdResult run(const std::string& cmd) {
  CmdResult r{0, ""};
  FILE* p = ::popen((cmd + " 2>/dev/null").c_str(), "r");
  if (!p) return {-1, ""};
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  r.status = ::pclose(p);
  return r;
}

std::string mpiexec(int np) {
  return "mpiexec --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(np) + " ";
}
}  // namespace

TEST(GenerateCli, ReproducesFixturesAtOneAndTwoRanks) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    for (int np : {1, 2}) {
      for (const auto* c : f.base_cases()) {
        const CmdResult r = run(mpiexec(np) + QUILT_BINARY + " generate --json --model " + quote(f.dir) + " --prompt " +
                          quote(c->prompt) + " --max-new-tokens " + std::to_string(f.max_new_tokens));
        ASSERT_EQ(r.status, 0) << r.out;
        const auto j = nlohmann::json::parse(r.out);
        EXPECT_EQ(j["prompt_ids"].get<std::vector<int>>(), c->prompt_ids) << f.name;
        EXPECT_EQ(j["greedy_ids"].get<std::vector<int>>(), c->greedy_ids) << f.name << " np=" << np;
        ASSERT_EQ(j["prompt_logprobs"].size(), c->prompt_logprobs.size());
        EXPECT_TRUE(j["prompt_logprobs"][0].is_null());
        for (size_t i = 1; i < c->prompt_logprobs.size(); ++i)
          EXPECT_NEAR(j["prompt_logprobs"][i].get<double>(), *c->prompt_logprobs[i], 1e-3) << f.name;
        const auto glp = j["greedy_logprobs"].get<std::vector<double>>();
        ASSERT_EQ(glp.size(), c->greedy_logprobs.size());
        for (size_t i = 0; i < glp.size(); ++i) EXPECT_NEAR(glp[i], c->greedy_logprobs[i], 1e-3);
        EXPECT_TRUE(j["text"].is_string());
      }
    }
  }
}

TEST(GenerateCli, AdapterReproducesPeftAtOneTwoAndFourRanks) {
  for (const auto& f : quilt::testing::load_fixtures()) {
    for (int np : {1, 2, 4}) {
      for (const auto& c : f.cases) {
        if (!c.adapter || c.prompt_ids.size() > 60) continue;  // the short and medium prompts
        const CmdResult r = run(mpiexec(np) + QUILT_BINARY + " generate --json --model " + quote(f.dir) + " --adapter " +
                                quote(f.dir + "/adapters/" + *c.adapter) + " --prompt " + quote(c.prompt) +
                                " --max-new-tokens " + std::to_string(f.max_new_tokens));
        ASSERT_EQ(r.status, 0) << r.out;
        const auto j = nlohmann::json::parse(r.out);
        EXPECT_EQ(j["greedy_ids"].get<std::vector<int>>(), c.greedy_ids) << f.name << " " << *c.adapter << " np=" << np;
        for (size_t i = 1; i < c.prompt_logprobs.size(); ++i)
          EXPECT_NEAR(j["prompt_logprobs"][i].get<double>(), *c.prompt_logprobs[i], 1e-3) << f.name << " " << *c.adapter;
      }
    }
  }
}

TEST(GenerateCli, BadModelFolderIsAClearErrorNotACrash) {
  const CmdResult r = run(std::string(QUILT_BINARY) + " generate --json --model /tmp --prompt hi 2>&1");
  EXPECT_NE(r.status, 0);
  const CmdResult r2 = run("sh -c " + quote(std::string(QUILT_BINARY) + " generate --model /tmp --prompt hi 2>&1"));
  EXPECT_NE(r2.out.find("config.json"), std::string::npos) << r2.out;
}
