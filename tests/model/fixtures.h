#pragma once
// The golden fixtures written by tests/golden/make_fixtures.py (Hugging Face transformers + PEFT
// in fp32): one folder per tiny checkpoint with expected.json.
#include <optional>
#include <string>
#include <vector>

namespace quilt::testing {

struct GoldenCase {
  std::optional<std::string> adapter;
  std::string prompt;
  std::vector<int> prompt_ids;
  std::vector<std::optional<double>> prompt_logprobs;
  std::vector<int> greedy_ids;
  std::vector<double> greedy_logprobs;
  std::vector<double> last_logits;
};

struct Fixture {
  std::string name, dir;
  int max_new_tokens = 0;
  std::vector<GoldenCase> cases;
  std::vector<const GoldenCase*> base_cases() const;  // adapter == null
};

// Every fixture under tests/golden/fixtures (or $QUILT_GOLDEN_DIR, to check other checkpoints
// made by the same script). Fails the test when none is found.
std::vector<Fixture> load_fixtures();

}  // namespace quilt::testing
