#pragma once
// The bodies of the HTTP API, without sockets: LoRAX's native routes (/generate,
// /generate_stream, /) and OpenAI's (/v1/completions, /v1/chat/completions). Api parses and
// validates a JSON body into a GenerateRequest (tokenized, truncated, checked against the
// config's limits) and renders answers; StreamWriter turns one request's coordinator events into
// the bytes of its server-sent-event stream. http_server.cpp only moves these bytes.
//
// Extensions and choices, where LoRAX or OpenAI leave room:
//  - Chat: Gemma's template, `<bos><start_of_turn>user\n{content}<end_of_turn>\n` per turn
//    (assistant turns are role "model"), then `<start_of_turn>model\n`; contents are trimmed as
//    Hugging Face's Gemma template does. A leading system message is folded into the first user
//    turn as "{system}\n\n{user}" (Gemma's own template rejects a system role).
//  - `<end_of_turn>` ends a chat answer: it is added as a stop sequence (its piece decodes to its
//    own text), and like every stop sequence on the /v1 routes it is cut from the answer.
//  - /v1 routes: a missing `temperature` or 0 means greedy (LoRAX's default); > 0 samples.
//    `n`, `best_of` > 1, `logit_bias`, `suffix`, tools and logprobs on a stream are refused (422).
//  - Native routes: top_p and typical_p may be 1.0 (off); the stream's last event carries
//    `details` only when `parameters.details` is true, as in LoRAX.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "model/tokenizer.h"
#include "runtime/config/serve_config.h"
#include "runtime/coordinator/detokenizer.h"
#include "runtime/coordinator/request.h"

namespace quilt {

// What /info and /v1/models say about the served model.
struct ModelInfo {
  std::string model_id = "quilt";  // also the OpenAI `model` that names the base model
  std::string dtype = "float32";   // /info model_dtype
  std::string device_type = "cpu"; // /info model_device_type
  std::string version = "0.1.0";
  std::string sha;                 // empty: null in /info
  std::vector<int> eos_ids;        // ids that end a sequence; empty: the tokenizer's EOS
};

namespace http {

enum class Route { generate, generate_stream, compat, completions, chat };
const char* route_name(Route r);  // metrics label: generate, generate_stream, compat, completions, chat
inline bool is_openai(Route r) { return r == Route::completions || r == Route::chat; }

// An error answer. On native routes {"error", "error_type"}; on /v1 routes
// {"error": {"message", "type", "param", "code"}} with code = the HTTP status.
struct Failure {
  int status = 422;
  std::string type = "validation";
  std::string message;
  std::string param;  // the offending field, when one is to blame
};

// A parsed and validated generation request, and how to answer it.
struct Job {
  Route route = Route::generate;
  GenerateRequest req;
  bool stream = false;
  bool details = false;          // native: details in the answer (or on the stream's last event)
  bool prefill_details = false;  // native: decoder_input_details
  int top_n = 0;                 // alternatives per token (native) or top logprobs (OpenAI)
  bool logprobs = false;         // OpenAI: logprobs in the answer
  bool sampled = false;          // the seed means something
  std::string prefix;            // prepended to the answer (return_full_text, echo)
  std::string model;             // echoed by OpenAI answers
  bool include_usage = false;    // OpenAI stream_options.include_usage
  std::string id;                // OpenAI answer id (cmpl-..., chatcmpl-...)
  int64_t created = 0;           // OpenAI answer time, Unix seconds
};

struct ChatMessage {
  std::string role, content;
};

class Api {
 public:
  Api(const ServeConfig& cfg, const Tokenizer& tok, ModelInfo info);

  // Parses the body of a generation route. `random_seed` is used when the request samples and
  // names no seed; `now` (Unix seconds) and `serial` make OpenAI ids.
  std::variant<Job, Failure> parse(Route route, std::string_view body, uint64_t random_seed,
                                   int64_t now = 0, uint64_t serial = 0) const;

  // Gemma's chat template, tokenized: BOS once, the turn markers as single tokens.
  std::variant<std::vector<int>, Failure> chat_prompt(const std::vector<ChatMessage>& messages) const;

  // The whole answer of a non-streaming request (the compat route's is a one-element array).
  std::string answer(const Job& job, const FinishEvent& f) const;
  // The error body for a route of this flavour.
  static std::string error_body(bool openai, const Failure& e);

  // `adapters`: what the coordinator reports as loading or resident (listed under "adapters").
  std::string info_json(int64_t started, const std::vector<AdapterStatus>& adapters = {}) const;
  std::string models_json(int64_t started) const;
  // POST /tokenize {"inputs", "add_special_tokens"?}: [{id, text, start, stop}] (char offsets).
  std::variant<std::string, Failure> tokenize(std::string_view body) const;

  // The text of one token as the API shows it: its decoded text, or its piece when special.
  std::string token_text(int id) const;
  const ModelInfo& info() const { return info_; }
  const Tokenizer& tokenizer() const { return tok_; }
  const std::vector<int>& eos_ids() const { return eos_ids_; }

 private:
  friend class StreamWriter;
  struct Parsed;
  std::optional<Failure> finish_prompt(Job& job, std::vector<int> ids, std::optional<int> truncate) const;

  ServeConfig cfg_;
  const Tokenizer& tok_;
  ModelInfo info_;
  std::vector<int> eos_ids_;
  int start_turn_ = -1, end_turn_ = -1;  // chat markers' ids, -1: missing
  bool end_turn_renders_ = false;        // decode(<end_of_turn>) == "<end_of_turn>"
};

// One request's stream: coordinator events in, server-sent-event bytes out. Native streams
// send one `data: {token, generated_text, details}` per token, the last with the text; the
// /v1 streams send chunks of text (holding back what may be the start of a stop sequence, which
// is never shown) and end with `data: [DONE]`.
class StreamWriter {
 public:
  StreamWriter(const Api& api, const Job& job);
  std::string on_token(const TokenEvent& t);
  std::string on_finish(const FinishEvent& f);
  std::string on_error(const ApiError& e);

 private:
  std::string native_event(const TokenEvent& t, const FinishEvent* last) const;
  std::string openai_chunk(const std::string& text, const char* finish_reason) const;
  std::string release(size_t upto);  // OpenAI: text [sent_, upto) as a chunk, or ""
  bool predicts_last(const TokenEvent& t) const;

  const Api& api_;
  const Job& job_;
  StopMatcher stops_;
  std::string text_;  // every token's text so far
  size_t sent_ = 0;   // OpenAI: bytes of text_ already sent
  size_t stop_at_ = std::string::npos;  // where a stop sequence starts in text_
  int count_ = 0;
  bool started_ = false;  // OpenAI chat: the role chunk went out
  std::optional<TokenEvent> held_;  // native: the token that is probably the last
};

// "data: " + json + "\n\n"
std::string sse(const std::string& json);

}  // namespace http
}  // namespace quilt
