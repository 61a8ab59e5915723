#include <gtest/gtest.h>

#include "model/tokenizer.h"
#include "runtime/coordinator/detokenizer.h"
#include "tests/model/fixtures.h"

using namespace quilt;

namespace {
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (int k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}
}  // namespace

TEST(Detokenizer, StreamsWholeCharactersOnly) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  auto tok = Tokenizer::load(fixtures.front().dir);
  // Non-ASCII text that this small tokenizer spells with byte-fallback pieces.
  const std::string text = " café naïve 日本語 🙂 and then some plain words";
  const std::vector<int> prompt = tok->encode("Hello");
  const std::vector<int> gen = tok->encode_raw(text);
  IncrementalDetokenizer d(*tok, prompt);
  int held = 0;
  std::string streamed;
  for (int id : gen) {
    const std::string piece = d.push(id);
    EXPECT_TRUE(valid_utf8(piece)) << "split character in piece '" << piece << "'";
    if (piece.empty()) ++held;
    streamed += piece;
  }
  streamed += d.flush();
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(d.text(), text);
  EXPECT_GT(held, 0) << "no byte-fallback token was held back: the test does not exercise splitting";
}

TEST(Detokenizer, FlushReleasesAnIncompleteTail) {
  const auto fixtures = quilt::testing::load_fixtures();
  ASSERT_FALSE(fixtures.empty());
  auto tok = Tokenizer::load(fixtures.front().dir);
  const std::vector<int> ids = tok->encode_raw("日");
  ASSERT_GT(ids.size(), 1u);  // byte pieces
  IncrementalDetokenizer d(*tok, {});
  EXPECT_EQ(d.push(ids[0]), "");
  EXPECT_FALSE(d.flush().empty());  // the replacement character, not silence
}

TEST(StopMatcher, FindsEarliestMatchEndingInNewText) {
  StopMatcher m({"\n\n", "END", ""});
  EXPECT_EQ(m.find("abc", 3), std::string::npos);
  EXPECT_EQ(m.find("abcEN", 2), std::string::npos);
  EXPECT_EQ(m.find("abcEND", 1), 3u);                  // completed across pieces
  EXPECT_EQ(m.find("x\n\ny END", 8), 1u);              // earliest of two
  EXPECT_EQ(m.find("END and more", 5), std::string::npos);  // old match, not re-reported
  EXPECT_TRUE(StopMatcher({}).empty());
}
