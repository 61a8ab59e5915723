// Throwaway benchmark server (KJ HTTP, one thread): GET /stream sends EVENTS SSE events, one every
// PERIOD ms; each event carries the CLOCK_MONOTONIC time (ns) at which it was due, so the client
// measures lateness. Usage: kj_sse_server PORT [EVENTS=20] [PERIOD_MS=50]
#include <kj/async-io.h>
#include <kj/compat/http.h>
#include <kj/debug.h>
#include <time.h>

#include <cstdio>
#include <cstdlib>
#include <string>

static int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct Service final : kj::HttpService {
  kj::Timer& timer;
  const kj::HttpHeaderTable& table;
  kj::HttpHeaderId ctype;
  int events, period_ms;
  Service(kj::Timer& t, const kj::HttpHeaderTable& tab, kj::HttpHeaderId ct, int e, int p)
      : timer(t), table(tab), ctype(ct), events(e), period_ms(p) {}

  kj::Promise<void> loop(kj::AsyncOutputStream& out, int64_t start, int k) {
    if (k == events) return kj::READY_NOW;
    const int64_t due = start + int64_t(k + 1) * period_ms * 1000000;
    // KJ's timer reads CLOCK_MONOTONIC too; atTime avoids the loop's cached now().
    return timer.atTime(kj::origin<kj::TimePoint>() + due * kj::NANOSECONDS)
        .then([this, &out, due, start, k]() {
          auto msg = kj::heapString(kj::str("data: {\"k\":", k, ",\"due\":", due, "}\n\n"));
          auto p = out.write(msg.begin(), msg.size());
          return p.attach(kj::mv(msg)).then([this, &out, start, k]() { return loop(out, start, k + 1); });
        });
  }

  kj::Promise<void> request(kj::HttpMethod, kj::StringPtr url, const kj::HttpHeaders&,
                            kj::AsyncInputStream&, Response& response) override {
    kj::HttpHeaders h(table);
    if (url != "/stream") return response.sendError(404, "Not Found", table);
    h.set(ctype, "text/event-stream");
    auto out = response.send(200, "OK", h);
    auto& ref = *out;
    return loop(ref, now_ns(), 0).attach(kj::mv(out));
  }
};

int main(int argc, char** argv) {
  const int port = argc > 1 ? atoi(argv[1]) : 8090;
  const int events = argc > 2 ? atoi(argv[2]) : 20;
  const int period = argc > 3 ? atoi(argv[3]) : 50;
  auto io = kj::setupAsyncIo();
  kj::HttpHeaderTable::Builder b;
  auto ctype = b.add("Content-Type");
  auto table = b.build();
  Service svc(io.provider->getTimer(), *table, ctype, events, period);
  kj::HttpServer server(io.provider->getTimer(), *table, svc);
  auto addr = io.provider->getNetwork().parseAddress("127.0.0.1", port).wait(io.waitScope);
  auto listener = addr->listen();
  fprintf(stderr, "kj listening on %d\n", listener->getPort());
  server.listenHttp(*listener).wait(io.waitScope);
}
