#include "runtime/coordinator/detokenizer.h"

#include <algorithm>

namespace quilt {
namespace {
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD
bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}
}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tok, const std::vector<int>& context)
    : tok_(tok) {
  const size_t keep = std::min<size_t>(context.size(), 5);
  ids_.assign(context.end() - keep, context.end());
  prefix_ = 0;
  read_ = ids_.size();
}

std::string IncrementalDetokenizer::push(int id) {
  ids_.push_back(id);
  const std::vector<int> before(ids_.begin() + prefix_, ids_.begin() + read_);
  const std::vector<int> after(ids_.begin() + prefix_, ids_.end());
  const std::string prefix_text = tok_.decode(before);
  const std::string new_text = tok_.decode(after);
  if (new_text.size() > prefix_text.size() && !ends_with(new_text, kReplacement) &&
      new_text.compare(0, prefix_text.size(), prefix_text) == 0) {
    std::string out = new_text.substr(prefix_text.size());
    prefix_ = read_;
    read_ = ids_.size();
    text_ += out;
    return out;
  }
  return "";
}

std::string IncrementalDetokenizer::flush() {
  if (read_ == ids_.size()) return "";
  const std::string prefix_text = tok_.decode(std::vector<int>(ids_.begin() + prefix_, ids_.begin() + read_));
  const std::string new_text = tok_.decode(std::vector<int>(ids_.begin() + prefix_, ids_.end()));
  prefix_ = read_ = ids_.size();
  std::string out = new_text.size() > prefix_text.size() ? new_text.substr(prefix_text.size()) : "";
  text_ += out;
  return out;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (auto& s : stops)
    if (!s.empty()) {
      longest_ = std::max(longest_, s.size());
      stops_.push_back(std::move(s));
    }
}

size_t StopMatcher::find(const std::string& text, size_t added) const {
  if (stops_.empty() || added == 0) return std::string::npos;
  // A new match must end inside the added bytes, so it starts no earlier than this.
  const size_t from = text.size() >= added + longest_ ? text.size() - added - longest_ + 1 : 0;
  size_t best = std::string::npos;
  for (const auto& s : stops_) {
    const size_t at = text.find(s, from);
    if (at != std::string::npos) best = std::min(best, at);
  }
  return best;
}

}  // namespace quilt
