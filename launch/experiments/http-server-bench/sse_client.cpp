// Throwaway benchmark client: opens N concurrent connections to 127.0.0.1:PORT (loopback only),
// GET /stream on each, and reads SSE events carrying their due time (CLOCK_MONOTONIC ns).
// Prints completed streams (EVENTS events each), event lateness p50/p99/max, and failures.
// Bounded: gives up after LIMIT_S seconds. RAMP > 0 opens RAMP connections per 10 ms instead of
// all at once. Usage: sse_client PORT N EVENTS LIMIT_S [RAMP=0]
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct Conn {
  int fd = -1;
  std::string buf;
  int events = 0;
  bool sent = false, done = false, failed = false;
  int64_t connect_start = 0, first_byte = 0;
};

int main(int argc, char** argv) {
  const int port = atoi(argv[1]);
  const int n = atoi(argv[2]);
  const int events = atoi(argv[3]);
  const int limit_s = atoi(argv[4]);
  const int ramp = argc > 5 ? atoi(argv[5]) : 0;
  const int ep = epoll_create1(0);
  std::vector<Conn> conns(n);
  std::vector<double> lat_ms;
  lat_ms.reserve(size_t(n) * events);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const std::string req = "GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n";
  const int64_t t0 = now_ns();
  int opened = 0, open = n;
  auto open_some = [&](int upto) {
    for (; opened < upto; ++opened) {
      Conn& c = conns[opened];
      c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      c.connect_start = now_ns();
      if (connect(c.fd, (sockaddr*)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        c.failed = true, --open;
        continue;
      }
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
      ev.data.u32 = opened;
      epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev);
    }
  };
  open_some(ramp > 0 ? std::min(n, ramp) : n);
  std::vector<epoll_event> evs(1024);
  char rb[65536];
  std::vector<double> ttfb_ms;
  while (open > 0 && now_ns() - t0 < int64_t(limit_s) * 1000000000) {
    if (opened < n) open_some(std::min<int64_t>(n, ramp * (1 + (now_ns() - t0) / 10000000)));
    const int k = epoll_wait(ep, evs.data(), evs.size(), opened < n ? 1 : 100);
    for (int e = 0; e < k; ++e) {
      Conn& c = conns[evs[e].data.u32];
      if (c.done || c.failed) continue;
      if (!c.sent && (evs[e].events & EPOLLOUT)) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || write(c.fd, req.data(), req.size()) != (ssize_t)req.size()) {
          c.failed = true, --open;
          close(c.fd);
          continue;
        }
        c.sent = true;
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.u32 = evs[e].data.u32;
        epoll_ctl(ep, EPOLL_CTL_MOD, c.fd, &ev);
      }
      if (evs[e].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        for (;;) {
          const ssize_t r = read(c.fd, rb, sizeof rb);
          if (r > 0) {
            const int64_t t = now_ns();
            if (!c.first_byte) {
              c.first_byte = t;
              ttfb_ms.push_back((t - c.connect_start) / 1e6);
            }
            c.buf.append(rb, r);
            size_t pos;
            while ((pos = c.buf.find("\"due\":")) != std::string::npos) {
              const size_t end = c.buf.find('}', pos);
              if (end == std::string::npos) break;
              const int64_t due = atoll(c.buf.c_str() + pos + 6);
              lat_ms.push_back((t - due) / 1e6);
              c.buf.erase(0, end + 1);
              if (++c.events == events) {
                c.done = true, --open;
                close(c.fd);
                break;
              }
            }
            if (c.done) break;
          } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
            c.failed = true, --open;
            close(c.fd);
            break;
          } else {
            break;
          }
        }
      }
    }
  }
  int done = 0, failed = 0;
  for (auto& c : conns) done += c.done, failed += c.failed;
  auto pct = [](std::vector<double>& v, double p) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(p * v.size()))];
  };
  const double secs = (now_ns() - t0) / 1e9;
  printf("ramp=%d/10ms clients=%d completed=%d failed=%d unfinished=%d events=%zu wall=%.2fs "
         "lateness_ms p50=%.2f p99=%.2f max=%.2f  ttfb_ms p50=%.1f p99=%.1f max=%.1f\n",
         ramp, n, done, failed, n - done - failed, lat_ms.size(), secs, pct(lat_ms, 0.5), pct(lat_ms, 0.99),
         pct(lat_ms, 1.0), pct(ttfb_ms, 0.5), pct(ttfb_ms, 0.99), pct(ttfb_ms, 1.0));
  return done == n ? 0 : 1;
}
