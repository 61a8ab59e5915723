#include "runtime/http/http_server.h"

#include <errno.h>
#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <kj/exception.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <utility>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>
#include <variant>

#include "runtime/core/check.h"
#include "runtime/core/log.h"

namespace quilt {
namespace {

using Event = std::variant<TokenEvent, FinishEvent, ApiError>;

// Carries coordinator events (from the coordinator's thread) to the server's loop: a locked
// vector, and an eventfd written when the vector turns non-empty so the loop wakes once per batch.
class EventQueue {
 public:
  struct Item {
    uint64_t key;
    Event ev;
  };
  EventQueue() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    QUILT_REQUIRE(fd_ >= 0, "http: eventfd failed: ", strerror(errno));
  }
  ~EventQueue() { ::close(fd_); }
  int fd() const { return fd_; }
  void push(uint64_t key, Event ev) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_) return;
      wake = items_.empty();
      items_.push_back(Item{key, std::move(ev)});
    }
    if (wake) signal();
  }
  std::vector<Item> take() {
    std::lock_guard<std::mutex> lk(mu_);
    return std::exchange(items_, {});
  }
  void request_stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    signal();
  }
  bool stop_requested() {
    std::lock_guard<std::mutex> lk(mu_);
    return stop_;
  }
  // After the loop has gone: later events (of requests it no longer serves) are dropped.
  void close() {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    items_.clear();
  }

 private:
  void signal() {
    const uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(fd_, &one, sizeof one);
  }
  std::mutex mu_;
  std::vector<Item> items_;
  bool stop_ = false, closed_ = false;
  int fd_;
};

// The coordinator's side of one request: never blocks, only queues.
class Sink final : public RequestSink {
 public:
  Sink(std::shared_ptr<EventQueue> q, uint64_t key) : q_(std::move(q)), key_(key) {}
  void on_token(const TokenEvent& t) override { q_->push(key_, t); }
  void on_finish(const FinishEvent& f) override { q_->push(key_, f); }
  void on_error(const ApiError& e) override { q_->push(key_, e); }

 private:
  std::shared_ptr<EventQueue> q_;
  uint64_t key_;
};

// Resolves when the client's socket reads EOF or fails, without consuming anything: it watches a
// dup of the connection's fd (a separate epoll registration) and peeks. Bytes of a pipelined
// next request end the watch (the client is still there).
class DisconnectWatch {
 public:
  DisconnectWatch(kj::UnixEventPort& port, int fd)
      : fd_{fd}, observer_(port, fd, kj::UnixEventPort::FdObserver::OBSERVE_READ) {}
  kj::Promise<void> gone() {
    char c;
    const ssize_t n = ::recv(fd_.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return kj::READY_NOW;
    if (n > 0) return kj::NEVER_DONE;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return kj::READY_NOW;
    return observer_.whenBecomesReadable().then([this] { return gone(); });
  }

 private:
  struct OwnedFd {
    int fd;
    ~OwnedFd() { ::close(fd); }
  };
  OwnedFd fd_;  // declared first: closed after the observer has left epoll
  kj::UnixEventPort::FdObserver observer_;
};

// KJ's own log lines go to Quilt's log. When a client leaves mid-stream, KJ's connection loop
// still flushes the half-written response and reports the failure as an "unhandled exception in
// HTTP server"; that is the expected end of such a connection, so it is logged at debug level.
class KjLogBridge final : public kj::ExceptionCallback {
 public:
  void logMessage(kj::LogSeverity severity, const char* file, int line, int contextDepth, kj::String&& text) override {
    (void)file, (void)line, (void)contextDepth;
    const std::string msg(text.cStr());
    const bool client_gone = msg.find("unhandled exception in HTTP server") != std::string::npos &&
                             (msg.find("disconnected") != std::string::npos ||
                              msg.find("previous HTTP message body incomplete") != std::string::npos);
    if (client_gone || severity == kj::LogSeverity::INFO || severity == kj::LogSeverity::DBG)
      log::debug("kj: ", msg);
    else
      log::warn("kj: ", msg);
  }
};

const char* status_text(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 424: return "Failed Dependency";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
  }
  return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
}

enum class Handler { health, info, metrics, models, tokenize, generate };

struct RouteDef {
  const char* path;
  kj::HttpMethod method;
  Handler handler;
  http::Route route;  // for Handler::generate
};

const RouteDef kRoutes[] = {
    {"/", kj::HttpMethod::GET, Handler::health, {}},
    {"/", kj::HttpMethod::POST, Handler::generate, http::Route::compat},
    {"/generate", kj::HttpMethod::POST, Handler::generate, http::Route::generate},
    {"/generate_stream", kj::HttpMethod::POST, Handler::generate, http::Route::generate_stream},
    {"/v1/completions", kj::HttpMethod::POST, Handler::generate, http::Route::completions},
    {"/v1/chat/completions", kj::HttpMethod::POST, Handler::generate, http::Route::chat},
    {"/v1/models", kj::HttpMethod::GET, Handler::models, {}},
    {"/tokenize", kj::HttpMethod::POST, Handler::tokenize, {}},
    {"/health", kj::HttpMethod::GET, Handler::health, {}},
    {"/info", kj::HttpMethod::GET, Handler::info, {}},
    {"/metrics", kj::HttpMethod::GET, Handler::metrics, {}},
};

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

struct HttpServer::Impl final : public kj::HttpServerErrorHandler {
  Impl(const ServeConfig& c, const Tokenizer& t, Coordinator& co, Metrics& m, ModelInfo info, HttpServerOptions o)
      : cfg(c), coord(co), metrics(m), api(c, t, std::move(info)), opts(o), rng(std::random_device{}()) {
    metrics.counter("quilt_http_responses_total", "HTTP responses by route and status");
    metrics.gauge("quilt_http_streams", "Server-sent-event streams open now");
    metrics.gauge("quilt_http_connections", "HTTP connections open now");
  }

  // ---- one generation request, on the loop thread ----
  struct Exchange {
    Impl& s;
    http::Job job;
    http::StreamWriter writer;  // after job: it keeps a reference to it
    const char* label;
    uint64_t key;
    uint64_t id = 0;
    bool submitted = false, ended = false, streaming = false;
    std::deque<Event> events;
    kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> waiter;
    kj::Own<kj::AsyncOutputStream> out;

    Exchange(Impl& impl, http::Job j, const char* l)
        : s(impl), job(std::move(j)), writer(impl.api, job), label(l), key(impl.next_key++) {
      s.pending[key] = this;
    }
    ~Exchange() {
      s.pending.erase(key);
      if (submitted && !ended) s.coord.cancel(id);  // the client went away: free its KV blocks
      if (streaming) s.metrics.set("quilt_http_streams", static_cast<double>(--s.streams));
    }
    void deliver(Event&& e) {
      if (!std::holds_alternative<TokenEvent>(e)) ended = true;
      events.push_back(std::move(e));
      KJ_IF_MAYBE(w, waiter) {
        (*w)->fulfill();
        waiter = nullptr;
      }
    }
    kj::Promise<void> ready() {
      if (!events.empty()) return kj::READY_NOW;
      auto paf = kj::newPromiseAndFulfiller<void>();
      waiter = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    }
  };

  class Service final : public kj::HttpService {
   public:
    Service(Impl& s, kj::AsyncIoStream& conn) : s_(s), conn_(conn) {
      s_.metrics.set("quilt_http_connections", static_cast<double>(++s_.connections));
    }
    ~Service() { s_.metrics.set("quilt_http_connections", static_cast<double>(--s_.connections)); }
    kj::Promise<void> request(kj::HttpMethod method, kj::StringPtr url, const kj::HttpHeaders& headers,
                              kj::AsyncInputStream& body, Response& response) override {
      return s_.handle(method, url, headers, body, response, conn_);
    }

   private:
    Impl& s_;
    kj::AsyncIoStream& conn_;
  };

  // ---- replies ----
  kj::Promise<void> reply(kj::HttpService::Response& response, int status, const char* label, kj::StringPtr type,
                          std::string body, const char* allow = nullptr) {
    metrics.inc("quilt_http_responses_total", 1, {{"route", label}, {"status", std::to_string(status)}});
    kj::HttpHeaders h(*table);
    h.set(kj::HttpHeaderId::CONTENT_TYPE, type);
    if (allow != nullptr) h.add("Allow", allow);
    auto out = response.send(status, status_text(status), h, static_cast<uint64_t>(body.size()));
    if (body.empty()) return kj::READY_NOW;
    auto data = kj::heap<std::string>(std::move(body));
    auto& stream = *out;
    return stream.write(data->data(), data->size()).attach(kj::mv(out), kj::mv(data));
  }
  kj::Promise<void> reply_json(kj::HttpService::Response& response, int status, const char* label, std::string body) {
    return reply(response, status, label, "application/json", std::move(body));
  }
  kj::Promise<void> reply_error(kj::HttpService::Response& response, bool openai, const char* label,
                                const http::Failure& f, const char* allow = nullptr) {
    return reply(response, f.status, label, "application/json", http::Api::error_body(openai, f), allow);
  }

  // ---- routing ----
  kj::Promise<void> handle(kj::HttpMethod method, kj::StringPtr url, const kj::HttpHeaders& headers,
                           kj::AsyncInputStream& body, kj::HttpService::Response& response, kj::AsyncIoStream& conn) {
    std::string path(url.cStr());
    if (auto q = path.find_first_of("?#"); q != std::string::npos) path.resize(q);
    const bool openai = path.rfind("/v1/", 0) == 0;
    const RouteDef* route = nullptr;
    std::string allow;
    for (const auto& r : kRoutes) {
      if (path != r.path) continue;
      if (r.method == method) route = &r;
      allow += std::string(allow.empty() ? "" : ", ") + kj::str(r.method).cStr();
    }
    if (route == nullptr) {
      if (allow.empty())
        return reply_error(response, openai, "other", http::Failure{404, "not_found", "no route " + path, ""});
      const std::string msg = std::string(kj::str(method).cStr()) + " is not allowed on " + path + " (allowed: " + allow + ")";
      auto allow_header = kj::heap<std::string>(allow);
      auto p = reply_error(response, openai, route_label(path), http::Failure{405, "method_not_allowed", msg, ""},
                           allow_header->c_str());
      return p.attach(kj::mv(allow_header));
    }
    const char* label = route->path;
    switch (route->handler) {
      case Handler::health: {
        const CoordinatorStatus st = coord.status();
        if (!st.healthy)
          return reply_error(response, false, label,
                             http::Failure{503, "unhealthy",
                                           std::to_string(st.workers_up) + " of " + std::to_string(st.workers_total) +
                                               " workers are up",
                                           ""});
        return reply_json(response, 200, label,
                          "{\"status\":\"ok\",\"workers_up\":" + std::to_string(st.workers_up) + "}");
      }
      case Handler::info: return reply_json(response, 200, label, api.info_json(started_at, coord.status().adapters));
      case Handler::models: return reply_json(response, 200, label, api.models_json(started_at));
      case Handler::metrics:
        return reply(response, 200, label, "text/plain; version=0.0.4; charset=utf-8", metrics.render());
      case Handler::tokenize:
      case Handler::generate: break;
    }
    // A POST: read the body (bounded), then parse it.
    KJ_IF_MAYBE(len, body.tryGetLength()) {
      if (*len > opts.max_body_bytes) return too_large(response, openai, label);
    }
    kj::Promise<void> proceed = kj::READY_NOW;
    KJ_IF_MAYBE(expect, headers.get(expect_id)) {
      // curl waits for this before sending a large body; KJ's server does not send it itself.
      if (strcasecmp(expect->cStr(), "100-continue") == 0) {
        static const char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";
        proceed = conn.write(kContinue, sizeof kContinue - 1);
      }
    }
    const RouteDef r = *route;
    return proceed.then([this, &body]() { return body.readAllText(opts.max_body_bytes + 1); })
        .then(
            [this, r, openai, label, &response, &conn](kj::String text) -> kj::Promise<void> {
              const std::string_view b(text.cStr(), text.size());
              if (r.handler == Handler::tokenize) {
                auto res = api.tokenize(b);
                if (auto* f = std::get_if<http::Failure>(&res)) return reply_error(response, false, label, *f);
                return reply_json(response, 200, label, std::move(std::get<std::string>(res)));
              }
              auto parsed = api.parse(r.route, b, rng(), unix_now(), ++serial);
              if (auto* f = std::get_if<http::Failure>(&parsed)) return reply_error(response, openai, label, *f);
              return generate(std::move(std::get<http::Job>(parsed)), label, response, conn);
            },
            [this, openai, label, &response](kj::Exception&& e) -> kj::Promise<void> {
              if (e.getType() == kj::Exception::Type::DISCONNECTED) return kj::mv(e);
              // readAllText's limit: the body is larger than allowed.
              return too_large(response, openai, label);
            });
  }

  static const char* route_label(const std::string& path) {
    for (const auto& r : kRoutes)
      if (path == r.path) return r.path;
    return "other";
  }

  kj::Promise<void> too_large(kj::HttpService::Response& response, bool openai, const char* label) {
    return reply_error(response, openai, label,
                       http::Failure{413, "validation",
                                     "the request body is larger than " + std::to_string(opts.max_body_bytes) + " bytes",
                                     ""});
  }

  // ---- generation ----
  kj::Promise<void> generate(http::Job job, const char* label, kj::HttpService::Response& response,
                             kj::AsyncIoStream& conn) {
    auto ex = kj::heap<Exchange>(*this, std::move(job), label);
    Exchange& e = *ex;
    e.id = coord.submit(e.job.req, std::make_shared<Sink>(queue, e.key));
    e.submitted = true;
    kj::Promise<void> work = e.job.stream ? stream_start(e, response) : whole(e, response);
    return watch_disconnect(conn).exclusiveJoin(kj::mv(work)).attach(kj::mv(ex));
  }

  kj::Promise<void> watch_disconnect(kj::AsyncIoStream& conn) {
    KJ_IF_MAYBE(fd, conn.getFd()) {
      const int dup = ::dup(*fd);
      if (dup < 0) return kj::NEVER_DONE;
      auto w = kj::heap<DisconnectWatch>(*event_port, dup);
      auto& watch = *w;
      return watch.gone().attach(kj::mv(w)).then([]() -> kj::Promise<void> {
        return KJ_EXCEPTION(DISCONNECTED, "the client went away");
      });
    }
    return kj::NEVER_DONE;
  }

  // A non-streaming answer: wait for the end, send it whole.
  kj::Promise<void> whole(Exchange& e, kj::HttpService::Response& response) {
    return e.ready().then([this, &e, &response]() -> kj::Promise<void> {
      while (!e.events.empty()) {
        Event ev = std::move(e.events.front());
        e.events.pop_front();
        if (auto* f = std::get_if<FinishEvent>(&ev)) return reply_json(response, 200, e.label, api.answer(e.job, *f));
        if (auto* err = std::get_if<ApiError>(&ev))
          return reply_error(response, http::is_openai(e.job.route), e.label,
                             http::Failure{err->status, err->type, err->message, ""});
      }
      return whole(e, response);
    });
  }

  // A stream: its status waits for the first event, so a request the coordinator refuses at once
  // (429, 422, ...) still gets its HTTP status; later errors travel as events.
  kj::Promise<void> stream_start(Exchange& e, kj::HttpService::Response& response) {
    return e.ready().then([this, &e, &response]() -> kj::Promise<void> {
      if (auto* err = std::get_if<ApiError>(&e.events.front()))
        return reply_error(response, http::is_openai(e.job.route), e.label,
                           http::Failure{err->status, err->type, err->message, ""});
      metrics.inc("quilt_http_responses_total", 1, {{"route", e.label}, {"status", "200"}});
      kj::HttpHeaders h(*table);
      h.set(kj::HttpHeaderId::CONTENT_TYPE, "text/event-stream");
      h.add("Cache-Control", "no-cache");
      h.add("X-Accel-Buffering", "no");
      e.out = response.send(200, "OK", h);
      e.streaming = true;
      metrics.set("quilt_http_streams", static_cast<double>(++streams));
      return pump(e);
    });
  }

  // Sends what has arrived in one write, then waits for more, until the request ends.
  kj::Promise<void> pump(Exchange& e) {
    std::string bytes;
    bool done = false;
    while (!e.events.empty() && !done) {
      Event ev = std::move(e.events.front());
      e.events.pop_front();
      if (auto* t = std::get_if<TokenEvent>(&ev)) {
        bytes += e.writer.on_token(*t);
      } else if (auto* f = std::get_if<FinishEvent>(&ev)) {
        bytes += e.writer.on_finish(*f);
        done = true;
      } else {
        bytes += e.writer.on_error(std::get<ApiError>(ev));
        done = true;
      }
    }
    kj::Promise<void> sent = kj::READY_NOW;
    if (!bytes.empty()) {
      auto data = kj::heap<std::string>(std::move(bytes));
      sent = e.out->write(data->data(), data->size()).attach(kj::mv(data));
    }
    if (done) return sent.then([&e] { e.out = nullptr; });  // ends the chunked body
    return sent.then([&e] { return e.ready(); }).then([this, &e] { return pump(e); });
  }

  // ---- the loop ----
  void drain() {
    for (auto& item : queue->take()) {
      auto it = pending.find(item.key);
      if (it != pending.end()) it->second->deliver(std::move(item.ev));
    }
  }

  kj::Promise<void> wake_loop(kj::AsyncInputStream& in) {
    return in.tryRead(&wake_count, sizeof wake_count, sizeof wake_count).then([this, &in](size_t) -> kj::Promise<void> {
      drain();
      if (queue->stop_requested()) return kj::READY_NOW;
      return wake_loop(in);
    });
  }

  void run() {
    KjLogBridge kj_log;  // this thread's KJ log callback while it lives
    try {
      auto io = kj::setupAsyncIo();
      event_port = &io.unixEventPort;
      kj::HttpHeaderTable::Builder builder;
      expect_id = builder.add("Expect");
      auto header_table = builder.build();
      table = header_table.get();
      auto addr = io.provider->getNetwork().parseAddress(cfg.host, static_cast<uint>(cfg.port)).wait(io.waitScope);
      auto listener = addr->listen();
      kj::HttpServerSettings settings;
      settings.errorHandler = *this;
      kj::HttpServer server(
          io.provider->getTimer(), *header_table,
          [this](kj::AsyncIoStream& conn) -> kj::Own<kj::HttpService> { return kj::heap<Service>(*this, conn); },
          settings);
      auto listening = server.listenHttp(*listener).eagerlyEvaluate([](kj::Exception&& e) {
        log::error("http: the accept loop failed: ", e.getDescription().cStr());
      });
      auto wake = io.lowLevelProvider->wrapInputFd(
          queue->fd(), kj::LowLevelAsyncIoProvider::ALREADY_NONBLOCK | kj::LowLevelAsyncIoProvider::ALREADY_CLOEXEC);
      {
        std::lock_guard<std::mutex> lk(mu);
        bound_port = static_cast<int>(listener->getPort());
        ready = true;
      }
      cv.notify_all();
      if (!queue->stop_requested()) wake_loop(*wake).wait(io.waitScope);
      // Leaving this scope destroys the server first: every connection closes and each request
      // still running is cancelled at the coordinator.
    } catch (const kj::Exception& e) {
      fail(e.getDescription().cStr());
    } catch (const std::exception& e) {
      fail(e.what());
    }
    queue->close();
  }

  void fail(const std::string& msg) {
    std::lock_guard<std::mutex> lk(mu);
    if (!ready) {
      start_error = msg.empty() ? "unknown error" : msg;
      ready = true;
      cv.notify_all();
    } else {
      log::error("http: the server stopped: ", msg);
    }
  }

  // ---- kj::HttpServerErrorHandler ----
  kj::Promise<void> handleClientProtocolError(kj::HttpHeaders::ProtocolError error,
                                              kj::HttpService::Response& response) override {
    return reply_error(response, false, "other",
                       http::Failure{static_cast<int>(error.statusCode), "validation",
                                     std::string("bad HTTP request: ") + error.description.cStr(), ""});
  }
  kj::Promise<void> handleApplicationError(kj::Exception exception,
                                           kj::Maybe<kj::HttpService::Response&> response) override {
    if (exception.getType() == kj::Exception::Type::DISCONNECTED) return kj::READY_NOW;  // nobody to answer
    log::error("http: a request failed: ", exception.getDescription().cStr());
    KJ_IF_MAYBE(r, response) {
      return reply_error(*r, false, "other",
                         http::Failure{500, "internal", std::string("internal error: ") + exception.getDescription().cStr(), ""});
    }
    return kj::READY_NOW;
  }
  kj::Promise<void> handleNoResponse(kj::HttpService::Response& response) override {
    return reply_error(response, false, "other", http::Failure{500, "internal", "the server sent no response", ""});
  }

  ServeConfig cfg;
  Coordinator& coord;
  Metrics& metrics;
  http::Api api;
  HttpServerOptions opts;
  std::shared_ptr<EventQueue> queue = std::make_shared<EventQueue>();
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool ready = false;
  std::string start_error;
  int bound_port = -1;
  int64_t started_at = unix_now();
  // Owned by the loop thread:
  std::unordered_map<uint64_t, Exchange*> pending;
  uint64_t next_key = 1, serial = 0;
  std::mt19937_64 rng;
  kj::UnixEventPort* event_port = nullptr;
  const kj::HttpHeaderTable* table = nullptr;
  kj::HttpHeaderId expect_id;
  uint64_t wake_count = 0;
  int streams = 0, connections = 0;
};

HttpServer::HttpServer(const ServeConfig& cfg, const Tokenizer& tok, Coordinator& coord, Metrics& metrics,
                       ModelInfo info, HttpServerOptions options)
    : impl_(std::make_unique<Impl>(cfg, tok, coord, metrics, std::move(info), options)) {}

HttpServer::~HttpServer() { stop(); }

void HttpServer::start() {
  Impl& s = *impl_;
  QUILT_REQUIRE(!s.thread.joinable(), "http: the server was started already");
  s.thread = std::thread([&s] { s.run(); });
  std::unique_lock<std::mutex> lk(s.mu);
  s.cv.wait(lk, [&] { return s.ready; });
  if (!s.start_error.empty()) {
    const std::string err = s.start_error;
    lk.unlock();
    s.thread.join();
    QUILT_FAIL("http: cannot listen on ", s.cfg.host, ":", s.cfg.port, ": ", err);
  }
  log::info("http: listening on http://", s.cfg.host, ":", s.bound_port);
}

int HttpServer::port() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->bound_port;
}

void HttpServer::stop() {
  Impl& s = *impl_;
  if (!s.thread.joinable()) return;
  s.queue->request_stop();
  s.thread.join();
}

}  // namespace quilt
