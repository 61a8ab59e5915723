#pragma once
// What the HTTP layer hands the coordinator, and what flows back to it. The HTTP layer validates
// and tokenizes; the coordinator schedules, detokenizes and decides when a request stops.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/messages/messages.h"

namespace quilt {

struct GenerateRequest {
  std::vector<int> prompt_ids;         // tokenized (BOS included), already truncated
  messages::SamplingParams sampling;   // max_new_tokens, seed, prompt_logprobs, top-n alternatives
  std::vector<std::string> stop;       // stop sequences, matched on the decoded text
  bool ignore_eos_token = false;
  std::string adapter;                 // adapter_id; "" = the base model
  std::string adapter_source;          // "", "local" or "hub" (see adapter_source.h)
  std::string route;                   // for metrics: "generate", "chat", ...
};

enum class FinishReason { length, eos_token, stop_sequence };
const char* finish_reason_name(FinishReason r);

struct TokenEvent {
  int id = 0;
  std::string text;  // the text this token completed (may be empty while a character is split)
  float logprob = 0;
  bool special = false;
  std::vector<messages::TokenLogprob> alternatives;
  bool last = false;  // the request finishes with this token (on_finish follows)
};

struct FinishEvent {
  FinishReason reason = FinishReason::length;
  std::string generated_text;  // up to and including a stop sequence, as LoRAX returns it
  size_t stop_at = std::string::npos;  // byte offset where the matched stop sequence starts
  int prompt_tokens = 0;
  int generated_tokens = 0;
  uint64_t seed = 0;
  bool sampled = false;                 // seed is meaningful
  std::vector<float> prompt_logprobs;   // when asked for: NaN for the first token
  std::vector<TokenEvent> tokens;       // every generated token
  double queue_s = 0, ttft_s = 0, total_s = 0;
};

// An adapter on a replica, as /info lists it.
struct AdapterStatus {
  std::string id, path, state;  // state: loading | resident
  int replica = 0, slot = -1;
};

struct ApiError {
  int status = 500;        // HTTP status
  std::string type;        // LoRAX error_type: validation, overloaded, generation, ...
  std::string message;
};

// Receives a request's events on the coordinator's thread. Implementations must not block.
// Exactly one of on_finish / on_error ends every request that submit() accepted.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void on_token(const TokenEvent& t) = 0;
  virtual void on_finish(const FinishEvent& f) = 0;
  virtual void on_error(const ApiError& e) = 0;
};

}  // namespace quilt
