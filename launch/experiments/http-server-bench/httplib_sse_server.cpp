// Throwaway benchmark server (cpp-httplib 0.11, thread per connection from a pool of THREADS):
// same stream as kj_sse_server. Usage: httplib_sse_server PORT THREADS [EVENTS=20] [PERIOD_MS=50]
#include <httplib.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <thread>

static int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int main(int argc, char** argv) {
  const int port = argc > 1 ? atoi(argv[1]) : 8091;
  const int threads = argc > 2 ? atoi(argv[2]) : 8;
  const int events = argc > 3 ? atoi(argv[3]) : 20;
  const int period = argc > 4 ? atoi(argv[4]) : 50;
  httplib::Server svr;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  svr.Get("/stream", [&](const httplib::Request&, httplib::Response& res) {
    const int64_t start = now_ns();
    res.set_chunked_content_provider("text/event-stream", [=](size_t, httplib::DataSink& sink) {
      for (int k = 0; k < events; ++k) {
        const int64_t due = start + int64_t(k + 1) * period * 1000000;
        const int64_t wait = due - now_ns();
        if (wait > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(wait));
        const std::string msg = "data: {\"k\":" + std::to_string(k) + ",\"due\":" + std::to_string(due) + "}\n\n";
        if (!sink.write(msg.data(), msg.size())) return false;
      }
      sink.done();
      return true;
    });
  });
  fprintf(stderr, "httplib listening on %d with %d threads\n", port, threads);
  svr.listen("127.0.0.1", port);
}
