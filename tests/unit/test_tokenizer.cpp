#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "model/tokenizer.h"
#include "runtime/core/check.h"
#include "tests/model/fixtures.h"

using quilt::Tokenizer;
namespace fs = std::filesystem;

TEST(Tokenizer, EncodesWithBosAndDecodesBack) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  auto tok = Tokenizer::load(fixtures.front().dir);
  EXPECT_TRUE(tok->add_bos());
  for (const std::string text : {"Hello world", "café naïve 日本語 🙂", "  two  spaces"}) {
    const auto ids = tok->encode(text);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.front(), tok->bos_id());
    EXPECT_EQ(std::vector<int>(ids.begin() + 1, ids.end()), tok->encode_raw(text));
    EXPECT_EQ(tok->decode(ids), text);  // BOS is a control token and decodes to nothing
  }
  EXPECT_TRUE(tok->is_special(tok->bos_id()));
  EXPECT_TRUE(tok->is_special(tok->eos_id()));
  EXPECT_EQ(tok->piece_to_id("<bos>"), 2);
  EXPECT_EQ(tok->piece_to_id("no-such-piece-xyz"), -1);
  EXPECT_THROW(tok->decode({tok->vocab_size()}), quilt::Error);
}

TEST(Tokenizer, HonoursAddBosTokenFalse) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  const fs::path dir = fs::temp_directory_path() / ("quilt_tok_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::copy_file(fs::path(fixtures.front().dir) / "tokenizer.model", dir / "tokenizer.model");
  std::ofstream(dir / "tokenizer_config.json") << R"({"add_bos_token": false})";
  auto tok = Tokenizer::load(dir.string());
  EXPECT_EQ(tok->encode("Hello"), tok->encode_raw("Hello"));
  std::ofstream(dir / "tokenizer_config.json") << R"({"bos_token": "<nope>"})";
  EXPECT_THROW(Tokenizer::load(dir.string()), quilt::Error);
  fs::remove_all(dir);
}

TEST(Tokenizer, MissingOrCorruptModelIsAClearError) {
  const fs::path dir = fs::temp_directory_path() / ("quilt_tok_bad_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  try {
    Tokenizer::load(dir.string());
    FAIL();
  } catch (const quilt::Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.model"), std::string::npos);
  }
  std::ofstream(dir / "tokenizer.model") << "not a sentencepiece model";
  EXPECT_THROW(Tokenizer::load(dir.string()), quilt::Error);
  fs::remove_all(dir);
}
