#pragma once
// Rank 0's HTTP API: LoRAX's routes (/generate, /generate_stream, /, /tokenize, /health, /info,
// /metrics) and OpenAI's (/v1/completions, /v1/chat/completions, /v1/models) on one socket.
//
// KJ's HTTP server (Cap'n Proto's event loop: one thread, every connection; see
// launch/experiments/http-server-choice.md for the measurement behind the choice) runs on a
// thread of its own. Coordinator events reach it through a queue and an eventfd, so a sink never
// blocks the coordinator's thread. A client that goes away (its socket reads EOF or a write fails)
// cancels its request. KJ stays inside http_server.cpp; api.h holds the JSON.
#include <cstddef>
#include <memory>

#include "model/tokenizer.h"
#include "runtime/config/serve_config.h"
#include "runtime/coordinator/coordinator.h"
#include "runtime/coordinator/metrics.h"
#include "runtime/http/api.h"

namespace quilt {

struct HttpServerOptions {
  size_t max_body_bytes = 8u << 20;  // larger request bodies get 413
};

class HttpServer {
 public:
  // Declares its own metric families on `metrics` (quilt_http_*). `tok`, `coord` and `metrics`
  // must outlive the server.
  HttpServer(const ServeConfig& cfg, const Tokenizer& tok, Coordinator& coord, Metrics& metrics,
             ModelInfo info, HttpServerOptions options = {});
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Listens on cfg.host:cfg.port (port 0: an ephemeral one) and starts serving. Throws
  // quilt::Error naming the address when it cannot listen.
  void start();
  int port() const;  // the bound port, once started
  // Stops listening and closes every connection (their requests are cancelled at the
  // coordinator); joins the server's thread. Idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace quilt
