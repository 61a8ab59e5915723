#include "runtime/http/api.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

namespace quilt::http {
namespace {

using json = nlohmann::ordered_json;
constexpr const char* kStartTurn = "<start_of_turn>";
constexpr const char* kEndTurn = "<end_of_turn>";
constexpr int kMaxAlternatives = 64;     // return_k_alternatives, top_logprobs
constexpr int kMaxCompletionLogprobs = 5;  // OpenAI's limit on /v1/completions `logprobs`

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// JSON has no NaN or infinity: a logprob that is not finite is shown as the lowest float.
double finite(float v) {
  if (std::isfinite(v)) return v;
  return std::isnan(v) ? 0.0 : (v > 0 ? std::numeric_limits<float>::max() : std::numeric_limits<float>::lowest());
}

std::string trim(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

Failure invalid(std::string message, std::string param = "") {
  return Failure{422, "validation", std::move(message), std::move(param)};
}

size_t utf8_chars(const std::string& s, size_t from, size_t to) {
  size_t n = 0;
  for (size_t i = from; i < to && i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) ++n;
  return n;
}

// Reads the optional fields of one JSON object; null counts as absent. The first field of the
// wrong type or out of range becomes `fail`, and later reads are skipped.
class Fields {
 public:
  Fields(const json& obj, std::optional<Failure>& fail) : obj_(obj), fail_(fail) {}
  bool failed() const { return fail_.has_value(); }
  bool has(const char* k) const { return obj_.is_object() && obj_.contains(k) && !obj_[k].is_null(); }
  const json& at(const char* k) const { return obj_[k]; }
  void reject(std::string msg, const char* param) {
    if (!fail_) fail_ = invalid(std::move(msg), param);
  }

  std::optional<double> number(const char* k) {
    if (failed() || !has(k)) return std::nullopt;
    const json& v = obj_[k];
    if (!v.is_number()) return reject(std::string("`") + k + "` must be a number", k), std::nullopt;
    const double d = v.get<double>();
    if (!std::isfinite(d)) return reject(std::string("`") + k + "` must be finite", k), std::nullopt;
    return d;
  }
  std::optional<int64_t> integer(const char* k) {
    if (failed() || !has(k)) return std::nullopt;
    const json& v = obj_[k];
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
        return reject(std::string("`") + k + "` is too large", k), std::nullopt;
      return static_cast<int64_t>(u);
    }
    if (v.is_number_integer()) {
      const int64_t i = v.get<int64_t>();
      if (i < std::numeric_limits<int32_t>::min()) return reject(std::string("`") + k + "` is too small", k), std::nullopt;
      return i;
    }
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) <= std::numeric_limits<int32_t>::max())
        return static_cast<int64_t>(d);
    }
    return reject(std::string("`") + k + "` must be an integer", k), std::nullopt;
  }
  std::optional<uint64_t> seed(const char* k) {
    if (failed() || !has(k)) return std::nullopt;
    const json& v = obj_[k];
    if (v.is_number_unsigned()) return v.get<uint64_t>();
    if (v.is_number_integer()) return reject(std::string("`") + k + "` must be positive", k), std::nullopt;
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (d >= 0 && d == std::floor(d) && d < 1.8e19) return static_cast<uint64_t>(d);
    }
    return reject(std::string("`") + k + "` must be a non-negative integer", k), std::nullopt;
  }
  std::optional<bool> boolean(const char* k) {
    if (failed() || !has(k)) return std::nullopt;
    if (!obj_[k].is_boolean()) return reject(std::string("`") + k + "` must be a boolean", k), std::nullopt;
    return obj_[k].get<bool>();
  }
  std::optional<std::string> string(const char* k) {
    if (failed() || !has(k)) return std::nullopt;
    if (!obj_[k].is_string()) return reject(std::string("`") + k + "` must be a string", k), std::nullopt;
    return obj_[k].get<std::string>();
  }
  // A string or a list of strings (OpenAI's `stop`); LoRAX sends a list.
  std::vector<std::string> strings(const char* k) {
    std::vector<std::string> out;
    if (failed() || !has(k)) return out;
    const json& v = obj_[k];
    if (v.is_string()) return {v.get<std::string>()};
    if (!v.is_array()) return reject(std::string("`") + k + "` must be a list of strings", k), out;
    for (const auto& e : v) {
      if (!e.is_string()) return reject(std::string("`") + k + "` must be a list of strings", k), out;
      out.push_back(e.get<std::string>());
    }
    return out;
  }

 private:
  const json& obj_;
  std::optional<Failure>& fail_;
};

bool contains(const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

}  // namespace

const char* route_name(Route r) {
  switch (r) {
    case Route::generate: return "generate";
    case Route::generate_stream: return "generate_stream";
    case Route::compat: return "compat";
    case Route::completions: return "completions";
    case Route::chat: return "chat";
  }
  return "?";
}

std::string sse(const std::string& j) { return "data: " + j + "\n\n"; }

Api::Api(const ServeConfig& cfg, const Tokenizer& tok, ModelInfo info)
    : cfg_(cfg), tok_(tok), info_(std::move(info)) {
  eos_ids_ = info_.eos_ids;
  if (eos_ids_.empty() && tok_.eos_id() >= 0) eos_ids_.push_back(tok_.eos_id());
  // The chat markers must be pieces of their own that text encodes to; never assume their ids.
  auto marker = [&](const char* piece) {
    const int id = tok_.piece_to_id(piece);
    if (id < 0) return -1;
    try {
      if (tok_.encode_raw(piece) != std::vector<int>{id}) return -1;
    } catch (const std::exception&) {
      return -1;
    }
    return id;
  };
  start_turn_ = marker(kStartTurn);
  end_turn_ = marker(kEndTurn);
  if (end_turn_ >= 0) {
    try {
      end_turn_renders_ = tok_.decode({end_turn_}) == kEndTurn;
    } catch (const std::exception&) {
      end_turn_renders_ = false;
    }
  }
}

std::string Api::token_text(int id) const {
  if (id < 0 || id >= tok_.vocab_size()) return "";
  if (tok_.is_special(id)) return tok_.id_to_piece(id);
  return tok_.decode({id});
}

// ---- parsing -------------------------------------------------------------------------------------

namespace {

// Checks shared by every route once the sampling fields are read.
void check_stops(Fields& f, const std::vector<std::string>& stops, int max_stops) {
  if (f.failed()) return;
  if (static_cast<int>(stops.size()) > max_stops)
    return f.reject("`stop` supports up to " + std::to_string(max_stops) + " stop sequences. Given: " +
                        std::to_string(stops.size()),
                    "stop");
  for (const auto& s : stops)
    if (s.empty()) return f.reject("`stop` sequences must not be empty", "stop");
}

// top_p and typical_p: a probability mass in (0, 1] on both the native and the OpenAI routes.
void nucleus(Fields& f, messages::SamplingParams& sp) {
  for (auto [key, out] : {std::pair{"top_p", &sp.top_p}, std::pair{"typical_p", &sp.typical_p}})
    if (auto p = f.number(key)) {
      if (*p <= 0 || *p > 1) f.reject("`" + std::string(key) + "` must be > 0.0 and <= 1.0", key);
      *out = static_cast<float>(*p);
    }
}

// adapter_source: "local" or "hub" (the coordinator refuses s3/pbase by name: no network here).
void adapter_fields(Fields& f, GenerateRequest& req) {
  if (auto src = f.string("adapter_source")) {
    static const char* kSources[] = {"hub", "local", "s3", "pbase"};
    if (std::find_if(std::begin(kSources), std::end(kSources), [&](const char* s) { return *src == s; }) ==
        std::end(kSources))
      f.reject("`adapter_source=" + *src + "` must be one of [hub, local, s3, pbase]", "adapter_source");
    req.adapter_source = *src;
  }
  (void)f.string("api_token");  // accepted for LoRAX compatibility; adapters are local here
}

}  // namespace

std::optional<Failure> Api::finish_prompt(Job& job, std::vector<int> ids, std::optional<int> truncate) const {
  const int bos = tok_.bos_id();
  if (truncate && static_cast<int>(ids.size()) > *truncate) {
    // Keep the last tokens, and BOS in front of them (the model was trained with it).
    const bool keep_bos = !ids.empty() && ids[0] == bos && *truncate >= 1;
    std::vector<int> out;
    if (keep_bos) out.push_back(bos);
    const size_t tail = static_cast<size_t>(*truncate) - out.size();
    out.insert(out.end(), ids.end() - static_cast<std::ptrdiff_t>(tail), ids.end());
    ids = std::move(out);
  }
  if (ids.empty()) return invalid("`inputs` cannot be empty", "inputs");
  const int n = static_cast<int>(ids.size());
  if (n > cfg_.max_input_length)
    return invalid("`inputs` must have less than " + std::to_string(cfg_.max_input_length) +
                       " tokens. Given: " + std::to_string(n),
                   "inputs");
  const int max_new = job.req.sampling.max_new_tokens;
  if (static_cast<int64_t>(n) + max_new > cfg_.max_total_tokens)
    return invalid("`inputs` tokens + `max_new_tokens` must be <= " + std::to_string(cfg_.max_total_tokens) +
                       ". Given: " + std::to_string(n) + " `inputs` tokens and " + std::to_string(max_new) +
                       " `max_new_tokens`",
                   "max_new_tokens");
  job.req.prompt_ids = std::move(ids);
  return std::nullopt;
}

std::variant<std::vector<int>, Failure> Api::chat_prompt(const std::vector<ChatMessage>& messages) const {
  if (start_turn_ < 0 || end_turn_ < 0)
    return Failure{500, "template",
                   "the chat routes need Gemma's <start_of_turn> and <end_of_turn> pieces, each one token, "
                   "and this model's tokenizer lacks them",
                   ""};
  if (messages.empty()) return invalid("`messages` cannot be empty", "messages");
  size_t i = 0;
  std::string system;
  if (messages[0].role == "system") {
    system = trim(messages[0].content);
    i = 1;
  }
  std::string text;
  int turns = 0;
  for (; i < messages.size(); ++i) {
    const auto& m = messages[i];
    const bool user_turn = (turns % 2) == 0;
    std::string role;
    if (m.role == "user") {
      role = "user";
    } else if (m.role == "assistant" || m.role == "model") {
      role = "model";
    } else if (m.role == "system") {
      return invalid("a system message may only come first", "messages");
    } else {
      return invalid("unknown role '" + m.role + "': use system, user or assistant", "messages");
    }
    if ((role == "user") != user_turn)
      return invalid("conversation roles must alternate user/assistant/user/... starting with user", "messages");
    std::string content = trim(m.content);
    if (turns == 0 && !system.empty()) content = system + "\n\n" + content;
    text += std::string(kStartTurn) + role + "\n" + content + kEndTurn + "\n";
    ++turns;
  }
  if (turns == 0) return invalid("`messages` needs a user message", "messages");
  text += std::string(kStartTurn) + "model\n";
  std::vector<int> ids;
  try {
    ids = tok_.encode_raw(text);
  } catch (const std::exception& e) {
    return invalid(std::string("cannot tokenize the conversation: ") + e.what(), "messages");
  }
  // BOS exactly once, first (encode_raw adds none; text never encodes to the BOS control token).
  const int bos = tok_.bos_id();
  if (bos >= 0) ids.insert(ids.begin(), bos);
  if (bos >= 0 && std::count(ids.begin(), ids.end(), bos) != 1)
    return Failure{500, "template", "the rendered chat template encodes BOS more than once", ""};
  if (std::count(ids.begin(), ids.end(), start_turn_) < turns + 1 || std::count(ids.begin(), ids.end(), end_turn_) < turns)
    return Failure{500, "template", "the tokenizer does not encode the chat turn markers as single tokens", ""};
  return ids;
}

struct Api::Parsed {
  // Reads the sampling fields every generation route shares.
  static void openai_sampling(Fields& f, Job& job, const ServeConfig& cfg, bool chat, bool& seeded) {
    auto& sp = job.req.sampling;
    if (auto t = f.number("temperature")) {
      if (*t < 0) f.reject("`temperature` must be non-negative", "temperature");
      if (*t > 0) {
        sp.temperature = static_cast<float>(*t);
        sp.do_sample = true;  // OpenAI: a temperature means sampling, 0 means greedy
      }
    }
    nucleus(f, sp);
    if (auto k = f.integer("top_k")) {
      if (*k < -1) f.reject("`top_k` must be positive, or 0 or -1 for no limit", "top_k");
      sp.top_k = *k > 0 ? static_cast<int32_t>(*k) : 0;
    }
    if (auto r = f.number("repetition_penalty")) {
      if (*r <= 0) f.reject("`repetition_penalty` must be strictly positive", "repetition_penalty");
      sp.repetition_penalty = static_cast<float>(*r);
    }
    penalties(f, sp);
    const char* max_key = chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    sp.max_new_tokens = cfg.default_max_new_tokens;
    if (auto m = f.integer(max_key)) {
      if (*m < 1) f.reject(std::string("`") + max_key + "` must be at least 1", max_key);
      sp.max_new_tokens = static_cast<int32_t>(*m);
    }
    if (auto n = f.integer("n"))
      if (*n != 1) f.reject("`n` must be 1: Quilt returns one choice per request", "n");
    if (!chat)
      if (auto b = f.integer("best_of"))
        if (*b != 1) f.reject("`best_of` must be 1", "best_of");
    if (auto s = f.seed("seed")) sp.seed = *s, seeded = true;
    job.req.stop = f.strings("stop");
    check_stops(f, job.req.stop, cfg.max_stop_sequences);
    if (auto s = f.boolean("stream")) job.stream = *s;
    if (f.has("stream_options")) {
      if (!f.at("stream_options").is_object()) {
        f.reject("`stream_options` must be an object", "stream_options");
      } else {
        std::optional<Failure> sub;
        Fields so(f.at("stream_options"), sub);
        if (auto u = so.boolean("include_usage")) job.include_usage = *u;
        if (sub) f.reject(sub->message, "stream_options");
      }
    }
    if (auto e = f.boolean("ignore_eos_token")) job.req.ignore_eos_token = *e;
    if (f.has("logit_bias") && !(f.at("logit_bias").is_object() && f.at("logit_bias").empty()))
      f.reject("`logit_bias` is not supported", "logit_bias");
    (void)f.string("user");
    adapter_fields(f, job.req);
  }

  static void penalties(Fields& f, messages::SamplingParams& sp) {
    if (auto p = f.number("frequency_penalty")) {
      if (*p < -2 || *p > 2) f.reject("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty");
      sp.frequency_penalty = static_cast<float>(*p);
    }
    if (auto p = f.number("presence_penalty")) {
      if (*p < -2 || *p > 2) f.reject("`presence_penalty` must be >= -2.0 and <= 2.0", "presence_penalty");
      sp.presence_penalty = static_cast<float>(*p);
    }
  }
};

std::variant<Job, Failure> Api::parse(Route route, std::string_view body, uint64_t random_seed, int64_t now,
                                      uint64_t serial) const {
  json j = json::parse(body.begin(), body.end(), nullptr, false);
  if (j.is_discarded()) return invalid("the request body is not valid JSON");
  if (!j.is_object()) return invalid("the request body must be a JSON object");
  Job job;
  job.route = route;
  job.req.route = route_name(route);
  job.created = now;
  std::optional<Failure> fail;
  Fields top(j, fail);
  auto& sp = job.req.sampling;
  bool seeded = false;
  std::optional<int> truncate;
  std::vector<int> ids;

  if (!is_openai(route)) {
    // LoRAX: {"inputs", "parameters": {...}, "stream"?}
    if (!j.contains("inputs") || !j["inputs"].is_string()) return invalid("`inputs` must be a string", "inputs");
    const std::string inputs = j["inputs"].get<std::string>();
    if (inputs.empty()) return invalid("`inputs` cannot be empty", "inputs");
    if (route == Route::compat)
      if (auto s = top.boolean("stream")) job.stream = *s;
    if (route == Route::generate_stream) job.stream = true;
    static const json kEmpty = json::object();
    const json& params = top.has("parameters") ? j["parameters"] : kEmpty;
    if (!params.is_object()) return invalid("`parameters` must be an object", "parameters");
    Fields f(params, fail);
    if (auto t = f.number("temperature")) {
      if (*t <= 0) f.reject("`temperature` must be strictly positive", "temperature");
      sp.temperature = static_cast<float>(*t);
    }
    if (auto r = f.number("repetition_penalty")) {
      if (*r <= 0) f.reject("`repetition_penalty` must be strictly positive", "repetition_penalty");
      sp.repetition_penalty = static_cast<float>(*r);
    }
    Parsed::penalties(f, sp);
    if (auto k = f.integer("top_k")) {
      if (*k <= 0) f.reject("`top_k` must be strictly positive", "top_k");
      sp.top_k = static_cast<int32_t>(*k);
    }
    nucleus(f, sp);
    if (auto d = f.boolean("do_sample")) sp.do_sample = *d;
    sp.max_new_tokens = cfg_.default_max_new_tokens;
    if (auto m = f.integer("max_new_tokens")) {
      if (*m < 1) f.reject("`max_new_tokens` must be strictly positive", "max_new_tokens");
      sp.max_new_tokens = static_cast<int32_t>(*m);
    }
    if (auto e = f.boolean("ignore_eos_token")) job.req.ignore_eos_token = *e;
    const bool full_text = f.boolean("return_full_text").value_or(false);
    job.req.stop = f.strings("stop");
    check_stops(f, job.req.stop, cfg_.max_stop_sequences);
    if (auto t = f.integer("truncate")) {
      if (*t <= 0 || *t > cfg_.max_input_length)
        f.reject("`truncate` must be strictly positive and less than " + std::to_string(cfg_.max_input_length) +
                     ". Given: " + std::to_string(*t),
                 "truncate");
      truncate = static_cast<int>(*t);
    }
    job.details = f.boolean("details").value_or(false);
    job.prefill_details = f.boolean("decoder_input_details").value_or(false);
    if (auto k = f.integer("return_k_alternatives")) {
      if (*k <= 0 || *k > kMaxAlternatives)
        f.reject("`return_k_alternatives` must be > 0 and <= " + std::to_string(kMaxAlternatives), "return_k_alternatives");
      job.top_n = static_cast<int>(*k);
    }
    if (auto s = f.seed("seed")) sp.seed = *s, seeded = true;
    if (auto b = f.integer("best_of")) {
      if (*b <= 0 || *b > cfg_.max_best_of)
        f.reject("`best_of` must be > 0 and <= " + std::to_string(cfg_.max_best_of) + ". Given: " + std::to_string(*b),
                 "best_of");
      else if (*b > 1)
        f.reject("`best_of` > 1 is not supported yet", "best_of");
    }
    if (f.boolean("watermark").value_or(false)) f.reject("`watermark` is not supported", "watermark");
    if (f.has("merged_adapters")) f.reject("`merged_adapters` is not supported", "merged_adapters");
    if (f.has("response_format")) f.reject("`response_format` is not supported", "response_format");
    if (f.boolean("apply_chat_template").value_or(false))
      f.reject("`apply_chat_template` is not supported: use /v1/chat/completions", "apply_chat_template");
    if (auto a = f.string("adapter_id")) job.req.adapter = *a;
    adapter_fields(f, job.req);
    if (!fail && job.stream && job.prefill_details)
      f.reject("`decoder_input_details` == true is not supported when streaming tokens", "decoder_input_details");
    if (fail) return *fail;
    if (full_text) job.prefix = inputs;
    try {
      ids = tok_.encode(inputs);
    } catch (const std::exception& e) {
      return invalid(std::string("cannot tokenize `inputs`: ") + e.what(), "inputs");
    }
  } else {
    // OpenAI: the model names the adapter; "" or the base model's id is the base model.
    const bool chat = route == Route::chat;
    job.model = top.string("model").value_or("");
    job.req.adapter = (job.model.empty() || job.model == info_.model_id) ? "" : job.model;
    if (job.model.empty()) job.model = info_.model_id;
    Parsed::openai_sampling(top, job, cfg_, chat, seeded);
    char idbuf[40];
    std::snprintf(idbuf, sizeof idbuf, "%s-%llx%06llx", chat ? "chatcmpl" : "cmpl",
                  static_cast<unsigned long long>(now), static_cast<unsigned long long>(serial & 0xFFFFFF));
    job.id = idbuf;
    if (chat) {
      if (auto lp = top.boolean("logprobs")) job.logprobs = *lp;
      if (auto k = top.integer("top_logprobs")) {
        if (*k < 0 || *k > 20) top.reject("`top_logprobs` must be >= 0 and <= 20", "top_logprobs");
        else if (!job.logprobs && *k > 0) top.reject("`top_logprobs` needs `logprobs` true", "top_logprobs");
        job.top_n = static_cast<int>(*k);
      }
      if (top.has("tools") && !(top.at("tools").is_array() && top.at("tools").empty()))
        top.reject("`tools` are not supported", "tools");
      if (top.has("response_format")) {
        const json& rf = top.at("response_format");
        if (!(rf.is_object() && rf.contains("type") && rf["type"] == "text"))
          top.reject("`response_format` other than text is not supported", "response_format");
      }
      if (fail) return *fail;
      if (!j.contains("messages") || !j["messages"].is_array())
        return invalid("`messages` must be a list of {role, content}", "messages");
      std::vector<ChatMessage> msgs;
      for (const auto& m : j["messages"]) {
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
          return invalid("each message needs a string `role`", "messages");
        ChatMessage cm;
        cm.role = m["role"].get<std::string>();
        const json* c = m.contains("content") ? &m["content"] : nullptr;
        if (c == nullptr || c->is_null()) {
          if (cm.role != "assistant") return invalid("a " + cm.role + " message needs `content`", "messages");
        } else if (c->is_string()) {
          cm.content = c->get<std::string>();
        } else if (c->is_array()) {
          for (const auto& part : *c) {
            if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
                !part["text"].is_string())
              return invalid("only text content parts are supported", "messages");
            cm.content += part["text"].get<std::string>();
          }
        } else {
          return invalid("`content` must be a string or a list of text parts", "messages");
        }
        msgs.push_back(std::move(cm));
      }
      auto rendered = chat_prompt(msgs);
      if (auto* e = std::get_if<Failure>(&rendered)) return *e;
      ids = std::move(std::get<std::vector<int>>(rendered));
      // <end_of_turn> ends the answer: as a stop sequence when it decodes to its text, else it
      // must be one of the EOS ids.
      if (end_turn_renders_) {
        job.req.stop.push_back(kEndTurn);
      } else if (!contains(eos_ids_, end_turn_)) {
        return Failure{500, "template",
                       "<end_of_turn> decodes to no text and is not an EOS id, so it cannot stop a chat answer", ""};
      }
    } else {
      if (auto lp = top.integer("logprobs")) {
        if (*lp < 0 || *lp > kMaxCompletionLogprobs)
          top.reject("`logprobs` must be >= 0 and <= " + std::to_string(kMaxCompletionLogprobs), "logprobs");
        job.logprobs = true;
        job.top_n = static_cast<int>(*lp);
      }
      if (top.has("suffix")) top.reject("`suffix` is not supported", "suffix");
      const bool echo = top.boolean("echo").value_or(false);
      if (fail) return *fail;
      std::string prompt;
      const json* p = j.contains("prompt") ? &j["prompt"] : nullptr;
      if (p != nullptr && p->is_string()) {
        prompt = p->get<std::string>();
      } else if (p != nullptr && p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
        prompt = (*p)[0].get<std::string>();
      } else {
        return invalid("`prompt` must be a string (or a list of one string)", "prompt");
      }
      if (prompt.empty()) return invalid("`prompt` cannot be empty", "prompt");
      if (echo) job.prefix = prompt;
      try {
        ids = tok_.encode(prompt);
      } catch (const std::exception& e) {
        return invalid(std::string("cannot tokenize `prompt`: ") + e.what(), "prompt");
      }
    }
    if (job.stream && job.logprobs) return invalid("`logprobs` are not supported when streaming", "logprobs");
    if (fail) return *fail;
  }

  if (fail) return *fail;
  // Sampling is on when asked for or when any warper is set (the workers' rule); a sampled
  // request without a seed gets a random one, which its answer reports.
  sp.do_sample = sp.do_sample || sp.temperature != 1.0f || sp.top_k > 0 || sp.top_p < 1.0f || sp.typical_p < 1.0f;
  job.sampled = sp.do_sample;
  if (!seeded && job.sampled) sp.seed = random_seed;
  sp.top_n_alternatives = job.top_n;
  sp.prompt_logprobs = job.prefill_details;
  if (auto e = finish_prompt(job, std::move(ids), truncate)) return *e;
  return job;
}

// ---- answers -------------------------------------------------------------------------------------

namespace {

json native_token(const Api& api, const TokenEvent& t, bool alternatives) {
  json o;
  o["id"] = t.id;
  o["text"] = t.text;
  o["logprob"] = finite(t.logprob);
  o["special"] = t.special;
  if (alternatives) {
    json alts = json::array();
    for (const auto& a : t.alternatives)
      alts.push_back(json{{"id", a.id}, {"text", api.token_text(a.id)}, {"logprob", finite(a.logprob)}});
    o["alternative_tokens"] = std::move(alts);
  }
  return o;
}

const char* openai_finish(FinishReason r) { return r == FinishReason::length ? "length" : "stop"; }

json usage(const FinishEvent& f) {
  return json{{"prompt_tokens", f.prompt_tokens},
              {"completion_tokens", f.generated_tokens},
              {"total_tokens", f.prompt_tokens + f.generated_tokens}};
}

// The answer's text on /v1 routes: a stop sequence and what follows are not part of it.
std::string openai_text(const FinishEvent& f) {
  if (f.stop_at != std::string::npos && f.stop_at <= f.generated_text.size()) return f.generated_text.substr(0, f.stop_at);
  return f.generated_text;
}

json seed_json(const Job& job, const FinishEvent& f) { return job.sampled ? json(f.seed) : json(nullptr); }

}  // namespace

std::string Api::answer(const Job& job, const FinishEvent& f) const {
  if (!is_openai(job.route)) {
    json o;
    o["generated_text"] = job.prefix + f.generated_text;
    if (job.details || job.prefill_details) {
      json d;
      d["finish_reason"] = finish_reason_name(f.reason);
      d["prompt_tokens"] = f.prompt_tokens;
      d["generated_tokens"] = f.generated_tokens;
      d["seed"] = seed_json(job, f);
      json prefill = json::array();
      if (job.prefill_details) {
        const auto& ids = job.req.prompt_ids;
        for (size_t i = 0; i < ids.size(); ++i) {
          json p{{"id", ids[i]}, {"text", token_text(ids[i])}, {"logprob", nullptr}};
          if (i > 0 && i < f.prompt_logprobs.size() && !std::isnan(f.prompt_logprobs[i]))
            p["logprob"] = finite(f.prompt_logprobs[i]);
          prefill.push_back(std::move(p));
        }
      }
      d["prefill"] = std::move(prefill);
      json tokens = json::array();
      for (const auto& t : f.tokens) tokens.push_back(native_token(*this, t, job.top_n > 0));
      d["tokens"] = std::move(tokens);
      o["details"] = std::move(d);
    }
    if (job.route == Route::compat) return dump(json::array({o}));
    return dump(o);
  }
  const std::string text = job.prefix + openai_text(f);
  json choice;
  choice["index"] = 0;
  if (job.route == Route::chat) {
    choice["message"] = json{{"role", "assistant"}, {"content", text}};
    if (job.logprobs) {
      json content = json::array();
      for (const auto& t : f.tokens) {
        auto bytes = [](const std::string& s) {
          json b = json::array();
          for (unsigned char c : s) b.push_back(static_cast<int>(c));
          return b;
        };
        json top = json::array();
        for (int k = 0; k < job.top_n && k < static_cast<int>(t.alternatives.size()); ++k) {
          const std::string at = token_text(t.alternatives[k].id);
          top.push_back(json{{"token", at}, {"logprob", finite(t.alternatives[k].logprob)}, {"bytes", bytes(at)}});
        }
        content.push_back(json{{"token", t.text}, {"logprob", finite(t.logprob)}, {"bytes", bytes(t.text)}, {"top_logprobs", top}});
      }
      choice["logprobs"] = json{{"content", content}};
    } else {
      choice["logprobs"] = nullptr;
    }
  } else {
    choice["text"] = text;
    if (job.logprobs) {
      json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
      size_t offset = job.prefix.size();
      for (const auto& t : f.tokens) {
        tokens.push_back(t.text);
        lps.push_back(finite(t.logprob));
        offsets.push_back(offset);
        offset += t.text.size();
        json top = json::object();
        for (int k = 0; k < job.top_n && k < static_cast<int>(t.alternatives.size()); ++k)
          top[token_text(t.alternatives[k].id)] = finite(t.alternatives[k].logprob);
        tops.push_back(std::move(top));
      }
      choice["logprobs"] = json{{"text_offset", offsets}, {"token_logprobs", lps}, {"tokens", tokens}, {"top_logprobs", tops}};
    } else {
      choice["logprobs"] = nullptr;
    }
  }
  choice["finish_reason"] = openai_finish(f.reason);
  json o;
  o["id"] = job.id;
  o["object"] = job.route == Route::chat ? "chat.completion" : "text_completion";
  o["created"] = job.created;
  o["model"] = job.model;
  o["choices"] = json::array({choice});
  o["usage"] = usage(f);
  return dump(o);
}

std::string Api::error_body(bool openai, const Failure& e) {
  if (!openai) return dump(json{{"error", e.message}, {"error_type", e.type}});
  json err{{"message", e.message}, {"type", e.type}, {"param", e.param.empty() ? json(nullptr) : json(e.param)}, {"code", e.status}};
  return dump(json{{"error", err}});
}

std::string Api::info_json(int64_t started, const std::vector<AdapterStatus>& adapters) const {
  json o;
  o["model_id"] = info_.model_id;
  o["model_sha"] = info_.sha.empty() ? json(nullptr) : json(info_.sha);
  o["model_dtype"] = info_.dtype;
  o["model_device_type"] = info_.device_type;
  o["model_pipeline_tag"] = "text-generation";
  o["max_concurrent_requests"] = cfg_.max_concurrent_requests;
  o["max_best_of"] = cfg_.max_best_of;
  o["max_stop_sequences"] = cfg_.max_stop_sequences;
  o["max_input_length"] = cfg_.max_input_length;
  o["max_total_tokens"] = cfg_.max_total_tokens;
  o["waiting_served_ratio"] = cfg_.waiting_served_ratio;
  o["max_batch_total_tokens"] = cfg_.max_batch_total_tokens;
  o["max_waiting_tokens"] = cfg_.max_waiting_tokens;
  o["validation_workers"] = 1;
  o["version"] = info_.version;
  o["sha"] = nullptr;
  o["docker_label"] = nullptr;
  o["request_logger_url"] = nullptr;
  // Quilt's own
  o["max_batch_prefill_tokens"] = cfg_.max_batch_prefill_tokens;
  o["max_running_requests"] = cfg_.max_running_requests;
  o["default_max_new_tokens"] = cfg_.default_max_new_tokens;
  o["block_size"] = cfg_.block_size;
  o["replicas"] = cfg_.replicas;
  o["tensor_parallel"] = cfg_.tensor_parallel;
  o["backend"] = cfg_.backend;
  o["started"] = started;
  o["adapter_slots"] = cfg_.adapter_slots;
  json ads = json::array();
  for (const auto& a : adapters)
    ads.push_back(json{{"id", a.id}, {"path", a.path}, {"state", a.state}, {"replica", a.replica}, {"slot", a.slot}});
  o["adapters"] = std::move(ads);
  return dump(o);
}

std::string Api::models_json(int64_t started) const {
  json m{{"id", info_.model_id}, {"object", "model"}, {"created", started}, {"owned_by", "quilt"}};
  return dump(json{{"object", "list"}, {"data", json::array({m})}});
}

std::variant<std::string, Failure> Api::tokenize(std::string_view body) const {
  json j = json::parse(body.begin(), body.end(), nullptr, false);
  if (j.is_discarded()) return invalid("the request body is not valid JSON");
  if (!j.is_object() || !j.contains("inputs") || !j["inputs"].is_string())
    return invalid("`inputs` must be a string", "inputs");
  std::optional<Failure> fail;
  Fields f(j, fail);
  const bool special = f.boolean("add_special_tokens").value_or(true);
  if (fail) return *fail;
  const std::string inputs = j["inputs"].get<std::string>();
  std::vector<int> ids;
  try {
    ids = special ? tok_.encode(inputs) : tok_.encode_raw(inputs);
  } catch (const std::exception& e) {
    return invalid(std::string("cannot tokenize `inputs`: ") + e.what(), "inputs");
  }
  // Offsets in characters of the decoded text; a character split over byte-fallback tokens
  // belongs to the token that completes it.
  IncrementalDetokenizer detok(tok_, {});
  json out = json::array();
  size_t chars = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string piece = detok.push(ids[i]);
    std::string text = piece;
    if (i + 1 == ids.size()) text += detok.flush();
    const size_t n = utf8_chars(text, 0, text.size());
    out.push_back(json{{"id", ids[i]}, {"text", tok_.id_to_piece(ids[i])}, {"start", chars}, {"stop", chars + n}});
    chars += n;
  }
  return dump(out);
}

// ---- streams -------------------------------------------------------------------------------------

StreamWriter::StreamWriter(const Api& api, const Job& job) : api_(api), job_(job), stops_(job.req.stop) {}

bool StreamWriter::predicts_last(const TokenEvent& t) const {
  // The coordinator marks the token that ends the request (EOS, stop sequence, length).
  return t.last;
}

std::string StreamWriter::native_event(const TokenEvent& t, const FinishEvent* last) const {
  json o;
  o["token"] = native_token(api_, t, job_.top_n > 0);
  if (last == nullptr) {
    o["generated_text"] = nullptr;
    o["details"] = nullptr;
  } else {
    o["generated_text"] = job_.prefix + last->generated_text;
    if (job_.details)
      o["details"] = json{{"finish_reason", finish_reason_name(last->reason)},
                          {"prompt_tokens", last->prompt_tokens},
                          {"generated_tokens", last->generated_tokens},
                          {"seed", seed_json(job_, *last)}};
    else
      o["details"] = nullptr;
  }
  return sse(dump(o));
}

std::string StreamWriter::openai_chunk(const std::string& text, const char* finish_reason) const {
  json choice;
  choice["index"] = 0;
  if (job_.route == Route::chat) {
    json delta = json::object();
    if (!started_) delta["role"] = "assistant";
    if (!text.empty() || !started_) delta["content"] = text;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason ? json(finish_reason) : json(nullptr);
  json o;
  o["id"] = job_.id;
  o["object"] = job_.route == Route::chat ? "chat.completion.chunk" : "text_completion";
  o["created"] = job_.created;
  o["model"] = job_.model;
  o["choices"] = json::array({choice});
  return sse(dump(o));
}

std::string StreamWriter::release(size_t upto) {
  if (upto <= sent_) return "";
  const std::string piece = text_.substr(sent_, upto - sent_);
  sent_ = upto;
  return openai_chunk(piece, nullptr);
}

std::string StreamWriter::on_token(const TokenEvent& t) {
  ++count_;
  if (!is_openai(job_.route)) {
    std::string out;
    if (held_) {  // the guess was wrong: it was not the last token after all
      out += native_event(*held_, nullptr);
      held_.reset();
    }
    text_ += t.text;
    if (stop_at_ == std::string::npos) stop_at_ = stops_.find(text_, t.text.size());
    if (predicts_last(t)) {
      held_ = t;  // sent with the finish, as the last event
      return out;
    }
    return out + native_event(t, nullptr);
  }
  std::string out;
  if (job_.route == Route::chat && !started_) {
    out += openai_chunk("", nullptr);  // the role
    started_ = true;
  }
  if (stop_at_ != std::string::npos) return out;
  text_ += t.text;
  stop_at_ = stops_.find(text_, t.text.size());
  if (stop_at_ != std::string::npos) return out + release(stop_at_);
  // Hold back a tail that may be the start of a stop sequence.
  size_t held = 0;
  for (const auto& s : job_.req.stop)
    for (size_t k = std::min(s.size() - 1, text_.size() - sent_); k > held; --k)
      if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
        held = k;
        break;
      }
  return out + release(text_.size() - held);
}

std::string StreamWriter::on_finish(const FinishEvent& f) {
  if (!is_openai(job_.route)) {
    TokenEvent last;
    if (held_) {
      last = *held_;
    } else if (!f.tokens.empty()) {
      last = f.tokens.back();  // the guess missed the end: the last token goes out twice
    }
    held_.reset();
    // Text the coordinator released only at the end (an incomplete character, as U+FFFD) goes
    // with the last token, so that the tokens' texts add up to generated_text.
    if (f.generated_text.size() > text_.size() && f.generated_text.compare(0, text_.size(), text_) == 0)
      last.text += f.generated_text.substr(text_.size());
    return native_event(last, &f);
  }
  std::string out;
  if (job_.route == Route::chat && !started_) {
    out += openai_chunk("", nullptr);
    started_ = true;
  }
  const std::string final_text = openai_text(f);
  if (final_text.size() > sent_ && final_text.compare(0, sent_, text_, 0, sent_) == 0) {
    out += openai_chunk(final_text.substr(sent_), nullptr);
    sent_ = final_text.size();
  }
  out += openai_chunk("", openai_finish(f.reason));
  if (job_.include_usage) {
    json o{{"id", job_.id},
           {"object", job_.route == Route::chat ? "chat.completion.chunk" : "text_completion"},
           {"created", job_.created},
           {"model", job_.model},
           {"choices", json::array()},
           {"usage", usage(f)}};
    out += sse(dump(o));
  }
  return out + "data: [DONE]\n\n";
}

std::string StreamWriter::on_error(const ApiError& e) {
  const Failure fl{e.status, e.type, e.message, ""};
  if (!is_openai(job_.route)) {
    std::string out;
    if (held_) out += native_event(*held_, nullptr);  // it was not the last after all
    held_.reset();
    return out + sse(Api::error_body(false, fl));
  }
  return sse(Api::error_body(true, fl)) + "data: [DONE]\n\n";
}

}  // namespace quilt::http
