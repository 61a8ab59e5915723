#pragma once
// Streaming detokenization that never splits a UTF-8 character: text is released only once
// the pieces decoded so far end on a whole character (TGI's prefix/read-offset scheme: decode
// the window with and without the new tokens and release the difference unless it ends in
// U+FFFD, the mark of an incomplete byte-fallback sequence).
#include <string>
#include <vector>

#include "model/tokenizer.h"

namespace quilt {

class IncrementalDetokenizer {
 public:
  // `context` is the tail of the prompt: it makes the first generated piece decode with the
  // spacing it has in context.
  IncrementalDetokenizer(const Tokenizer& tok, const std::vector<int>& context);
  // Adds a generated token; returns the text that became complete (possibly empty).
  std::string push(int id);
  // Releases whatever is still held back (an incomplete character decodes as U+FFFD).
  std::string flush();
  const std::string& text() const { return text_; }  // everything released so far

 private:
  const Tokenizer& tok_;
  std::vector<int> ids_;
  size_t prefix_ = 0, read_ = 0;
  std::string text_;
};

// Finds the first stop sequence in generated text, looking only where a new match can end.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Call with the whole text after each new piece of `added` bytes; returns the byte offset where
  // the earliest stop sequence starts, or npos.
  size_t find(const std::string& text, size_t added) const;
  bool empty() const { return stops_.empty(); }

 private:
  std::vector<std::string> stops_;
  size_t longest_ = 0;
};

}  // namespace quilt
