// The HTTP API end to end in one process: a real HttpServer on an ephemeral loopback port, a real
// coordinator and in-process workers on a golden fixture, and a small blocking HTTP/1.1 client.
// Every route's happy path and shape, the stream's event sequence, each error status, a client
// that disconnects mid-stream (its request is cancelled, the others go on), and 200 concurrent
// streams.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/coordinator/coordinator.h"
#include "runtime/http/http_server.h"
#include "tests/runtime/serving_harness.h"

using namespace quilt;
using nlohmann::json;

namespace {

// ---- a blocking HTTP/1.1 client (Content-Length and chunked bodies, 1xx skipped) ----

struct Reply {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  json js() const { return json::parse(body); }
};

class Client {
 public:
  explicit Client(int port, int timeout_s = 30) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{timeout_s, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~Client() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool send_raw(const std::string& bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  bool send(const std::string& method, const std::string& path, const std::string& body = "",
            const std::string& extra_headers = "") {
    std::string req = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra_headers;
    if (method == "POST") req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
    return connected_ && send_raw(req + "\r\n" + body);
  }
  // Reads until `needle` shows up in what was received (the raw bytes), or EOF/timeout.
  bool read_until(const std::string& needle) {
    while (buf_.find(needle) == std::string::npos)
      if (!fill()) return false;
    return true;
  }
  Reply read_reply() {
    Reply r;
    for (;;) {
      size_t end;
      while ((end = buf_.find("\r\n\r\n")) == std::string::npos)
        if (!fill()) return r;
      const std::string head = buf_.substr(0, end);
      buf_.erase(0, end + 4);
      r = Reply{};
      r.status = std::stoi(head.substr(9, 3));
      size_t pos = head.find("\r\n");
      while (pos != std::string::npos && pos < head.size()) {
        const size_t next = head.find("\r\n", pos + 2);
        const std::string line = head.substr(pos + 2, next == std::string::npos ? std::string::npos : next - pos - 2);
        const size_t colon = line.find(':');
        if (colon != std::string::npos) {
          std::string name = line.substr(0, colon);
          std::transform(name.begin(), name.end(), name.begin(), ::tolower);
          r.headers[name] = line.substr(line.find_first_not_of(' ', colon + 1));
        }
        pos = next;
      }
      if (r.status >= 200) break;  // 100 Continue: the real answer follows
    }
    if (r.headers["transfer-encoding"] == "chunked") {
      for (;;) {
        size_t eol;
        while ((eol = buf_.find("\r\n")) == std::string::npos)
          if (!fill()) return r;
        const size_t n = std::stoul(buf_.substr(0, eol), nullptr, 16);
        while (buf_.size() < eol + 2 + n + 2)
          if (!fill()) return r;
        r.body += buf_.substr(eol + 2, n);
        buf_.erase(0, eol + 2 + n + 2);
        if (n == 0) break;
      }
    } else if (r.headers.count("content-length")) {
      const size_t n = std::stoul(r.headers["content-length"]);
      while (buf_.size() < n)
        if (!fill()) return r;
      r.body = buf_.substr(0, n);
      buf_.erase(0, n);
    } else {
      while (fill()) {
      }
      r.body = std::move(buf_);
    }
    return r;
  }

 private:
  bool fill() {
    char tmp[65536];
    const ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
    if (n <= 0) return false;
    buf_.append(tmp, static_cast<size_t>(n));
    return true;
  }
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

Reply fetch(int port, const std::string& method, const std::string& path, const std::string& body = "",
           const std::string& extra = "") {
  Client c(port);
  if (!c.send(method, path, body, extra)) return {};
  return c.read_reply();
}

// The JSON payloads of a server-sent-event body; "[DONE]" stays a string.
std::vector<json> sse_events(const std::string& body) {
  std::vector<json> out;
  size_t pos = 0;
  while ((pos = body.find("data:", pos)) != std::string::npos) {
    const size_t end = body.find("\n\n", pos);
    std::string payload = body.substr(pos + 5, end - pos - 5);
    if (!payload.empty() && payload[0] == ' ') payload.erase(0, 1);
    out.push_back(payload == "[DONE]" ? json("[DONE]") : json::parse(payload));
    pos = end;
  }
  return out;
}

// ---- the serving harness plus the HTTP server ----

struct Job : quilt::testing::Job {
  std::unique_ptr<HttpServer> server;
  int port = 0;

  Job(const quilt::testing::Fixture& f, ServeConfig c, bool start_workers = true, HttpServerOptions opts = {})
      : quilt::testing::Job(f, c, start_workers) {
    ModelInfo info;
    info.model_id = cfg.model_id;
    info.eos_ids = mcfg.eos_token_ids;
    server = std::make_unique<HttpServer>(cfg, *tok, *coord, metrics, info, opts);
    server->start();
    port = server->port();
  }
  ~Job() { server->stop(); }  // before the base shuts the coordinator down
  bool wait_healthy() {
    for (int i = 0; i < 200 && !coord->status().healthy; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return coord->status().healthy;
  }
  bool wait_idle() {
    for (int i = 0; i < 300; ++i) {
      const auto st = coord->status();
      if (st.live_requests == 0 && std::all_of(st.kv_blocks_used.begin(), st.kv_blocks_used.end(), [](int b) { return b == 0; }))
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

ServeConfig small_config() {
  ServeConfig c;
  c.model_id = "tiny-gemma";
  c.host = "127.0.0.1";
  c.port = 0;
  c.max_input_length = 200;
  c.max_total_tokens = 256;
  c.max_batch_prefill_tokens = 1024;
  c.max_batch_total_tokens = 4096;
  c.heartbeat_interval_s = 0.05;
  c.heartbeat_timeout_s = 5;
  return c;
}

const quilt::testing::Fixture& fixture(const std::vector<quilt::testing::Fixture>& all, const std::string& name) {
  for (const auto& f : all)
    if (f.name == name) return f;
  return all.front();
}

std::vector<int> shown_ids(const std::vector<int>& ids) {
  std::vector<int> out;
  for (int id : ids)
    if (id != 1) out.push_back(id);
  return out;
}

}  // namespace

TEST(HttpServer, InfoModelsMetricsHealthAndTokenize) {
  const auto all = quilt::testing::load_fixtures();
  Job job(all.front(), small_config());
  ASSERT_TRUE(job.wait_healthy());
  Reply h = fetch(job.port, "GET", "/health");
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.js()["status"], "ok");
  EXPECT_EQ(fetch(job.port, "GET", "/").status, 200);  // LoRAX's health alias

  const Reply info = fetch(job.port, "GET", "/info");
  ASSERT_EQ(info.status, 200);
  EXPECT_EQ(info.headers.at("content-type"), "application/json");
  const json i = info.js();
  EXPECT_EQ(i["model_id"], "tiny-gemma");
  EXPECT_EQ(i["max_input_length"], 200);
  EXPECT_EQ(i["max_total_tokens"], 256);
  for (const char* k : {"model_dtype", "model_device_type", "max_concurrent_requests", "max_best_of",
                        "max_stop_sequences", "version", "waiting_served_ratio", "max_batch_total_tokens"})
    EXPECT_TRUE(i.contains(k)) << k;

  const json m = fetch(job.port, "GET", "/v1/models").js();
  EXPECT_EQ(m["object"], "list");
  ASSERT_EQ(m["data"].size(), 1u);
  EXPECT_EQ(m["data"][0]["id"], "tiny-gemma");
  EXPECT_EQ(m["data"][0]["object"], "model");

  const Reply t = fetch(job.port, "POST", "/tokenize", R"({"inputs": "The keeper wrote"})");
  ASSERT_EQ(t.status, 200);
  const json tj = t.js();
  const auto ids = job.tok->encode("The keeper wrote");
  ASSERT_EQ(tj.size(), ids.size());
  for (size_t k = 0; k < ids.size(); ++k) {
    EXPECT_EQ(tj[k]["id"], ids[k]);
    EXPECT_TRUE(tj[k].contains("text") && tj[k].contains("start") && tj[k].contains("stop"));
  }

  // a request first, so that the request metrics have samples
  ASSERT_EQ(fetch(job.port, "POST", "/generate", R"({"inputs": "The keeper wrote", "parameters": {"max_new_tokens": 2}})").status, 200);
  const Reply metrics = fetch(job.port, "GET", "/metrics");
  ASSERT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.headers.at("content-type").rfind("text/plain; version=0.0.4", 0), 0u);
  for (const char* name : {"quilt_requests_total", "quilt_request_duration_seconds_bucket", "quilt_http_responses_total",
                           "quilt_kv_blocks_used", "quilt_request_ttft_seconds"})
    EXPECT_NE(metrics.body.find(name), std::string::npos) << name;
}

TEST(HttpServer, GenerateMatchesTheGoldenTokensAndPromptLogprobs) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = fixture(all, "gqa-f32-new");
  Job job(f, small_config());
  for (const auto* c : f.base_cases()) {
    const json body{{"inputs", c->prompt},
                    {"parameters", {{"max_new_tokens", f.max_new_tokens}, {"details", true}, {"decoder_input_details", true}}}};
    const Reply r = fetch(job.port, "POST", "/generate", body.dump());
    ASSERT_EQ(r.status, 200) << r.body;
    const json o = r.js();
    std::vector<int> ids;
    for (const auto& t : o["details"]["tokens"]) ids.push_back(t["id"].get<int>());
    EXPECT_EQ(ids, c->greedy_ids) << f.name << ": " << c->prompt;
    EXPECT_EQ(o["generated_text"], job.tok->decode(shown_ids(c->greedy_ids)));
    EXPECT_EQ(o["details"]["generated_tokens"], static_cast<int>(c->greedy_ids.size()));
    EXPECT_TRUE(o["details"]["seed"].is_null());  // greedy
    const json& prefill = o["details"]["prefill"];
    ASSERT_EQ(prefill.size(), c->prompt_ids.size());
    EXPECT_TRUE(prefill[0]["logprob"].is_null());
    for (size_t k = 0; k < prefill.size(); ++k) {
      EXPECT_EQ(prefill[k]["id"], c->prompt_ids[k]);
      if (k > 0 && c->prompt_logprobs[k]) {
        EXPECT_NEAR(prefill[k]["logprob"].get<double>(), *c->prompt_logprobs[k], 1e-3) << k;
      }
    }
    for (size_t k = 0; k < c->greedy_logprobs.size() && k < o["details"]["tokens"].size(); ++k)
      EXPECT_NEAR(o["details"]["tokens"][k]["logprob"].get<double>(), c->greedy_logprobs[k], 1e-3);
  }
  // the compat route: `stream: false` answers a one-element array (lorax-client reads payload[0])
  const auto* c = f.base_cases()[0];
  const Reply compat = fetch(job.port, "POST", "/",
                            json{{"inputs", c->prompt}, {"stream", false}, {"parameters", {{"max_new_tokens", f.max_new_tokens}}}}.dump());
  ASSERT_EQ(compat.status, 200);
  ASSERT_TRUE(compat.js().is_array());
  EXPECT_EQ(compat.js()[0]["generated_text"], job.tok->decode(shown_ids(c->greedy_ids)));
  EXPECT_FALSE(compat.js()[0].contains("details"));
  // return_full_text and sampling with a seed: same seed, same answer, seed reported
  const json sampled{{"inputs", c->prompt},
                     {"parameters", {{"max_new_tokens", 6}, {"do_sample", true}, {"seed", 1234}, {"details", true},
                                     {"return_full_text", true}, {"ignore_eos_token", true}}}};
  const json s1 = fetch(job.port, "POST", "/generate", sampled.dump()).js();
  const json s2 = fetch(job.port, "POST", "/generate", sampled.dump()).js();
  EXPECT_EQ(s1["generated_text"], s2["generated_text"]);
  EXPECT_EQ(s1["details"]["seed"], 1234);
  EXPECT_EQ(s1["generated_text"].get<std::string>().rfind(c->prompt, 0), 0u);
  // return_k_alternatives: each token carries its alternatives
  const json alt = fetch(job.port, "POST", "/generate",
                        json{{"inputs", c->prompt}, {"parameters", {{"max_new_tokens", 2}, {"details", true}, {"return_k_alternatives", 3}}}}.dump())
                       .js();
  EXPECT_EQ(alt["details"]["tokens"][0]["alternative_tokens"].size(), 3u);
  EXPECT_EQ(alt["details"]["tokens"][0]["alternative_tokens"][0]["id"], alt["details"]["tokens"][0]["id"]);
}

TEST(HttpServer, GenerateStreamSendsOneEventPerTokenAndTheTextLast) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = all.front();
  Job job(f, small_config());
  for (const char* path : {"/generate_stream", "/"}) {
    for (const auto* c : f.base_cases()) {
      json body{{"inputs", c->prompt}, {"parameters", {{"max_new_tokens", f.max_new_tokens}, {"details", true}}}};
      if (std::string(path) == "/") body["stream"] = true;
      const Reply r = fetch(job.port, "POST", path, body.dump());
      ASSERT_EQ(r.status, 200) << r.body;
      EXPECT_EQ(r.headers.at("content-type"), "text/event-stream");
      const auto ev = sse_events(r.body);
      ASSERT_EQ(ev.size(), c->greedy_ids.size()) << r.body;
      std::vector<int> ids;
      std::string text;
      for (size_t k = 0; k < ev.size(); ++k) {
        ids.push_back(ev[k]["token"]["id"].get<int>());
        text += ev[k]["token"]["text"].get<std::string>();
        EXPECT_TRUE(ev[k]["token"].contains("logprob"));
        if (k + 1 < ev.size()) {
          EXPECT_TRUE(ev[k]["generated_text"].is_null());
          EXPECT_TRUE(ev[k]["details"].is_null());
        }
      }
      EXPECT_EQ(ids, c->greedy_ids);
      const json& last = ev.back();
      EXPECT_EQ(last["generated_text"], job.tok->decode(shown_ids(c->greedy_ids)));
      EXPECT_EQ(text, last["generated_text"].get<std::string>());
      EXPECT_EQ(last["details"]["generated_tokens"], static_cast<int>(c->greedy_ids.size()));
      EXPECT_EQ(last["details"]["prompt_tokens"], static_cast<int>(c->prompt_ids.size()));
      EXPECT_TRUE(last["details"].contains("finish_reason"));
    }
  }
}

TEST(HttpServer, OpenAICompletionsAndChat) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = all.front();
  Job job(f, small_config());
  const auto* c = f.base_cases()[2];
  const std::string expected = job.tok->decode(shown_ids(c->greedy_ids));
  // completions, whole
  const Reply r = fetch(job.port, "POST", "/v1/completions",
                       json{{"model", "tiny-gemma"}, {"prompt", c->prompt}, {"max_tokens", f.max_new_tokens}, {"temperature", 0}}.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  const json o = r.js();
  EXPECT_EQ(o["object"], "text_completion");
  EXPECT_EQ(o["model"], "tiny-gemma");
  EXPECT_EQ(o["choices"][0]["text"], expected);
  EXPECT_EQ(o["choices"][0]["index"], 0);
  EXPECT_EQ(o["usage"]["completion_tokens"], static_cast<int>(c->greedy_ids.size()));
  EXPECT_EQ(o["usage"]["prompt_tokens"], static_cast<int>(c->prompt_ids.size()));
  // completions, streamed: the same text, then [DONE]
  const Reply s = fetch(job.port, "POST", "/v1/completions",
                       json{{"model", ""}, {"prompt", c->prompt}, {"max_tokens", f.max_new_tokens}, {"stream", true}}.dump());
  ASSERT_EQ(s.status, 200);
  const auto ev = sse_events(s.body);
  ASSERT_GE(ev.size(), 2u);
  EXPECT_EQ(ev.back(), "[DONE]");
  std::string text;
  for (size_t k = 0; k + 1 < ev.size(); ++k) text += ev[k]["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(text, expected);
  EXPECT_FALSE(ev[ev.size() - 2]["choices"][0]["finish_reason"].is_null());

  // chat: the golden chat case is Gemma's template around one user turn
  const auto* chat = f.base_cases()[1];
  const std::string content = chat->prompt.substr(20, chat->prompt.find("<end_of_turn>") - 20);
  const json chat_body{{"model", "tiny-gemma"}, {"messages", {{{"role", "user"}, {"content", content}}}}, {"max_tokens", f.max_new_tokens}};
  const Reply cr = fetch(job.port, "POST", "/v1/chat/completions", chat_body.dump());
  ASSERT_EQ(cr.status, 200) << cr.body;
  const json co = cr.js();
  EXPECT_EQ(co["object"], "chat.completion");
  EXPECT_EQ(co["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(co["usage"]["prompt_tokens"], static_cast<int>(chat->prompt_ids.size()));  // BOS once, markers single
  // the golden continuation, cut at <end_of_turn> if the model produced one
  std::string golden = job.tok->decode(shown_ids(chat->greedy_ids));
  if (auto at = golden.find("<end_of_turn>"); at != std::string::npos) golden.resize(at);
  EXPECT_EQ(co["choices"][0]["message"]["content"], golden);
  json stream_body = chat_body;
  stream_body["stream"] = true;
  stream_body["stream_options"] = {{"include_usage", true}};
  const Reply cs = fetch(job.port, "POST", "/v1/chat/completions", stream_body.dump());
  ASSERT_EQ(cs.status, 200);
  const auto cev = sse_events(cs.body);
  ASSERT_GE(cev.size(), 3u);
  EXPECT_EQ(cev.front()["choices"][0]["delta"]["role"], "assistant");
  std::string streamed;
  for (const auto& e : cev)
    if (e.is_object() && !e["choices"].empty()) streamed += e["choices"][0]["delta"].value("content", "");
  EXPECT_EQ(streamed, golden);
  EXPECT_EQ(cev[cev.size() - 2]["usage"]["completion_tokens"], co["usage"]["completion_tokens"]);
  EXPECT_EQ(cev.back(), "[DONE]");
}

TEST(HttpServer, OpenAIAnswersOmitStopSequences) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = all.front();
  Job job(f, small_config());
  const json body{{"messages", {{{"role", "user"}, {"content", "Tell me a short story about the sea."}}}},
                  {"max_tokens", 30},
                  {"stop", {" "}}};
  const Reply r = fetch(job.port, "POST", "/v1/chat/completions", body.dump());
  ASSERT_EQ(r.status, 200) << r.body;
  const json o = r.js();
  const std::string content = o["choices"][0]["message"]["content"];
  EXPECT_EQ(content.find(' '), std::string::npos) << content;
  EXPECT_EQ(content.find("<end_of_turn>"), std::string::npos) << content;
}

TEST(HttpServer, ErrorStatusesAndShapes) {
  const auto all = quilt::testing::load_fixtures();
  auto cfg = small_config();
  HttpServerOptions opts;
  opts.max_body_bytes = 4096;
  Job job(all.front(), cfg, true, opts);
  auto native_error = [](const Reply& r) {
    const json o = json::parse(r.body);
    return o.contains("error") && o["error"].is_string() && o.contains("error_type");
  };
  auto openai_error = [](const Reply& r) {
    const json o = json::parse(r.body);
    return o["error"].is_object() && o["error"].contains("message") && o["error"].contains("type") &&
           o["error"].contains("param") && o["error"].contains("code");
  };
  // 404, 405
  Reply r = fetch(job.port, "GET", "/nope");
  EXPECT_EQ(r.status, 404);
  EXPECT_TRUE(native_error(r));
  r = fetch(job.port, "POST", "/v1/nope", "{}");
  EXPECT_EQ(r.status, 404);
  EXPECT_TRUE(openai_error(r));
  r = fetch(job.port, "GET", "/generate");
  EXPECT_EQ(r.status, 405);
  EXPECT_EQ(r.headers["allow"], "POST");
  EXPECT_EQ(fetch(job.port, "DELETE", "/health").status, 405);
  // 413: declared too large, and chunked past the limit
  r = fetch(job.port, "POST", "/generate", std::string(5000, ' '));
  EXPECT_EQ(r.status, 413);
  {
    Client c(job.port);
    std::string chunked = "POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 5; ++i) chunked += "3e8\r\n" + std::string(1000, ' ') + "\r\n";
    chunked += "0\r\n\r\n";
    ASSERT_TRUE(c.send_raw(chunked));
    EXPECT_EQ(c.read_reply().status, 413);
  }
  // 422: malformed JSON and out-of-range values, in each flavour
  r = fetch(job.port, "POST", "/generate", "{not json");
  EXPECT_EQ(r.status, 422);
  EXPECT_TRUE(native_error(r));
  EXPECT_EQ(r.js()["error_type"], "validation");
  r = fetch(job.port, "POST", "/generate", R"({"inputs": "abc", "parameters": {"temperature": 0}})");
  EXPECT_EQ(r.status, 422);
  r = fetch(job.port, "POST", "/generate", R"({"inputs": ""})");
  EXPECT_EQ(r.status, 422);
  r = fetch(job.port, "POST", "/generate", R"({"inputs": "abc", "parameters": {"max_new_tokens": 300}})");
  EXPECT_EQ(r.status, 422);
  EXPECT_NE(r.js()["error"].get<std::string>().find("<= 256"), std::string::npos) << r.body;
  r = fetch(job.port, "POST", "/generate_stream", R"({"inputs": "abc", "parameters": {"top_p": 2}})");
  EXPECT_EQ(r.status, 422);
  EXPECT_TRUE(native_error(r));
  r = fetch(job.port, "POST", "/v1/completions", R"({"prompt": "abc", "temperature": -2})");
  EXPECT_EQ(r.status, 422);
  EXPECT_TRUE(openai_error(r));
  EXPECT_EQ(r.js()["error"]["param"], "temperature");
  r = fetch(job.port, "POST", "/v1/chat/completions", "[");
  EXPECT_EQ(r.status, 422);
  EXPECT_TRUE(openai_error(r));
  // the coordinator's refusal of an unknown adapter (400 or 404, by the adapter issue's stage),
  // mapped straight through
  r = fetch(job.port, "POST", "/generate", R"({"inputs": "abc", "parameters": {"adapter_id": "nope"}})");
  EXPECT_TRUE(r.status == 400 || r.status == 404) << r.status;
  EXPECT_TRUE(native_error(r));
  const int adapter_status = r.status;
  r = fetch(job.port, "POST", "/v1/completions", R"({"model": "nope", "prompt": "abc", "stream": true})");
  EXPECT_EQ(r.status, adapter_status);  // refused before the stream starts: a status, not an event
  EXPECT_TRUE(openai_error(r));
  // Expect: 100-continue is answered, then the request runs
  r = fetch(job.port, "POST", "/generate", R"({"inputs": "abc", "parameters": {"max_new_tokens": 2}})",
           "Expect: 100-continue\r\n");
  EXPECT_EQ(r.status, 200);
}

TEST(HttpServer, OverloadedIs429) {
  // No workers: the first request stays in flight for as long as its client waits.
  const auto all = quilt::testing::load_fixtures();
  auto cfg = small_config();
  cfg.max_concurrent_requests = 1;
  Job job(all.front(), cfg, /*start_workers=*/false);
  Client busy(job.port);
  ASSERT_TRUE(busy.send("POST", "/generate", R"({"inputs": "The keeper wrote"})"));
  for (int i = 0; i < 500 && job.metrics.value("quilt_requests_total", {{"route", "generate"}}) == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  Reply r = fetch(job.port, "POST", "/generate_stream", R"({"inputs": "abc", "parameters": {"max_new_tokens": 2}})");
  EXPECT_EQ(r.status, 429);  // refused before the stream starts: a status, not an event
  EXPECT_EQ(r.js()["error_type"], "overloaded");
  r = fetch(job.port, "POST", "/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}]})");
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.js()["error"]["type"], "overloaded");
  EXPECT_EQ(r.js()["error"]["code"], 429);
}

TEST(HttpServer, HealthIs503UntilEveryWorkerIsUp) {
  const auto all = quilt::testing::load_fixtures();
  Job job(all.front(), small_config(), /*start_workers=*/false);
  const Reply r = fetch(job.port, "GET", "/health");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.js()["error_type"], "unhealthy");
}

TEST(HttpServer, ClientDisconnectCancelsOnlyItsRequest) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = all.front();
  Job job(f, small_config());
  const auto* c = f.base_cases()[2];
  Client leaver(job.port);
  ASSERT_TRUE(leaver.send("POST", "/generate_stream",
                          R"({"inputs": "The keeper wrote", "parameters": {"max_new_tokens": 240, "ignore_eos_token": true}})"));
  ASSERT_TRUE(leaver.read_until("data:"));  // it is streaming
  // a well-behaved neighbour streams at the same time
  std::thread neighbour([&] {
    const Reply r = fetch(job.port, "POST", "/generate_stream",
                          json{{"inputs", c->prompt}, {"parameters", {{"max_new_tokens", f.max_new_tokens}}}}.dump());
    EXPECT_EQ(r.status, 200);
    std::vector<int> ids;
    for (const auto& e : sse_events(r.body)) ids.push_back(e["token"]["id"].get<int>());
    EXPECT_EQ(ids, c->greedy_ids);
  });
  leaver.close();
  neighbour.join();
  EXPECT_TRUE(job.wait_idle()) << "the request still runs after its client left";
  EXPECT_EQ(job.metrics.value("quilt_requests_failed_total", {{"error_type", "cancelled"}}), 1);
}

TEST(HttpServer, ClientDisconnectWhileWaitingForAWholeAnswerCancels) {
  // No workers: the request waits for ever, so only its client's leaving can end it.
  const auto all = quilt::testing::load_fixtures();
  Job job(all.front(), small_config(), /*start_workers=*/false);
  for (const char* path : {"/generate", "/v1/completions"}) {
    const std::string route = std::string(path) == "/generate" ? "generate" : "completions";
    Client leaver(job.port);
    ASSERT_TRUE(leaver.send("POST", path, R"({"inputs": "The keeper wrote", "prompt": "The keeper wrote", "max_tokens": 5})"));
    for (int i = 0; i < 500 && job.metrics.value("quilt_requests_total", {{"route", route}}) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ASSERT_EQ(job.metrics.value("quilt_requests_total", {{"route", route}}), 1) << path;
    const double before = job.metrics.value("quilt_requests_failed_total", {{"error_type", "cancelled"}});
    leaver.close();
    for (int i = 0; i < 500 && job.metrics.value("quilt_requests_failed_total", {{"error_type", "cancelled"}}) == before; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    EXPECT_EQ(job.metrics.value("quilt_requests_failed_total", {{"error_type", "cancelled"}}), before + 1) << path;
  }
  EXPECT_TRUE(job.wait_idle());
}

TEST(HttpServer, TwoHundredConcurrentStreamsAllComplete) {
  const auto all = quilt::testing::load_fixtures();
  const auto& f = all.front();
  Job job(f, small_config());
  const auto cases = f.base_cases();
  constexpr int kClients = 200;
  std::atomic<int> complete{0};
  std::vector<std::thread> clients;
  std::mutex mu;
  std::vector<std::string> problems;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      const auto* c = cases[static_cast<size_t>(i) % cases.size()];
      const bool openai = i % 2 == 1;
      const Reply r = openai ? fetch(job.port, "POST", "/v1/completions",
                                    json{{"prompt", c->prompt}, {"max_tokens", f.max_new_tokens}, {"stream", true}}.dump())
                             : fetch(job.port, "POST", "/generate_stream",
                                    json{{"inputs", c->prompt}, {"parameters", {{"max_new_tokens", f.max_new_tokens}}}}.dump());
      const auto ev = r.status == 200 ? sse_events(r.body) : std::vector<json>{};
      bool ok = false;
      if (openai) {
        std::string text;
        for (size_t k = 0; k + 1 < ev.size(); ++k) text += ev[k]["choices"][0]["text"].get<std::string>();
        ok = !ev.empty() && ev.back() == "[DONE]" && text == job.tok->decode(shown_ids(c->greedy_ids));
      } else {
        std::vector<int> ids;
        for (const auto& e : ev) ids.push_back(e["token"]["id"].get<int>());
        ok = ids == c->greedy_ids && !ev.back()["generated_text"].is_null();
      }
      if (ok) {
        ++complete;
      } else {
        std::lock_guard<std::mutex> lk(mu);
        problems.push_back(std::to_string(r.status) + " " + r.body.substr(0, 200));
      }
    });
  for (auto& t : clients) t.join();
  EXPECT_EQ(complete.load(), kClients) << (problems.empty() ? "" : problems.front());
  EXPECT_TRUE(job.wait_idle());
}

TEST(HttpServer, StopClosesOpenStreams) {
  const auto all = quilt::testing::load_fixtures();
  Job job(all.front(), small_config());
  Client c(job.port, 10);
  ASSERT_TRUE(c.send("POST", "/generate_stream",
                     R"({"inputs": "The keeper wrote", "parameters": {"max_new_tokens": 240, "ignore_eos_token": true}})"));
  ASSERT_TRUE(c.read_until("data:"));
  job.server->stop();
  EXPECT_FALSE(c.read_until("never sent"));  // EOF, not a hang
  EXPECT_TRUE(job.wait_idle());               // its request was cancelled
  job.server->stop();                         // idempotent
}

// The requirement behind the server choice, on the real server: 1,000 concurrent streams.
// Disabled in the suite (it takes seconds); run with --gtest_also_run_disabled_tests.
TEST(HttpServer, DISABLED_ThousandConcurrentStreams) {
  const auto all = quilt::testing::load_fixtures();
  auto cfg = small_config();
  cfg.max_running_requests = 1024;  // every stream runs at once
  cfg.max_batch_total_tokens = 40000;
  cfg.max_batch_prefill_tokens = 16384;
  Job job(all.front(), cfg);
  constexpr int kClients = 1000, kTokens = 20;
  std::atomic<int> complete{0}, events{0};
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      const json body{{"inputs", "The keeper wrote " + std::to_string(i)},
                      {"parameters", {{"max_new_tokens", kTokens}, {"ignore_eos_token", true}}}};
      const Reply r = fetch(job.port, "POST", "/generate_stream", body.dump());
      const auto ev = r.status == 200 ? sse_events(r.body) : std::vector<json>{};
      events += static_cast<int>(ev.size());
      if (ev.size() == kTokens && !ev.back()["generated_text"].is_null()) ++complete;
    });
  for (auto& t : clients) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d/%d streams complete, %d events, %.2f s\n", complete.load(), kClients, events.load(), secs);
  EXPECT_EQ(complete.load(), kClients);
}

// For trying real clients by hand (lorax-client, openai, curl): serves the tiny golden model on
// $QUILT_HTTP_TEST_PORT for $QUILT_HTTP_TEST_SECONDS (default 60) seconds.
TEST(HttpServer, DISABLED_ServeForManualClients) {
  const auto all = quilt::testing::load_fixtures();
  auto cfg = small_config();
  const char* port = std::getenv("QUILT_HTTP_TEST_PORT");
  const char* secs = std::getenv("QUILT_HTTP_TEST_SECONDS");
  cfg.port = port ? std::atoi(port) : 8080;
  Job job(all.front(), cfg);
  std::printf("serving %s on http://127.0.0.1:%d\n", all.front().name.c_str(), job.port);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::seconds(secs ? std::atoi(secs) : 60));
}
