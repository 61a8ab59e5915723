#include "runtime/worker/worker.h"

#include <thread>

#include "runtime/core/log.h"

namespace quilt {

Worker::Worker(ModelRunner& runner, Transport& transport, WorkerOptions opt)
    : runner_(runner), transport_(transport), opt_(opt) {}

void Worker::heartbeat(uint64_t seq) {
  messages::Heartbeat hb;
  hb.rank = transport_.rank();
  hb.replica = opt_.replica;
  hb.sequence = seq;
  hb.sent_at_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  hb.busy = busy_.load();
  hb.kv_blocks_total = runner_.num_kv_blocks();
  hb.kv_blocks_free = hb.kv_blocks_total;  // the coordinator owns block accounting
  transport_.send(opt_.coordinator_rank, messages::encode(hb));
}

void Worker::run() {
  transport_.start([this](int, Bytes b) { inbox_.post(std::move(b)); });
  std::atomic<bool> done{false};
  std::thread beat([&] {
    uint64_t seq = 0;
    const auto interval = std::chrono::duration<double>(opt_.heartbeat_interval_s);
    auto next = std::chrono::steady_clock::now();
    while (!done.load()) {
      if (std::chrono::steady_clock::now() >= next) {
        heartbeat(seq++);
        next += std::chrono::duration_cast<std::chrono::steady_clock::duration>(interval);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  while (auto bytes = inbox_.pop()) {
    messages::Message m;
    try {
      m = messages::decode(*bytes);
    } catch (const std::exception& e) {
      log::error("worker: dropped a corrupt message: ", e.what());
      continue;
    }
    if (std::holds_alternative<messages::Shutdown>(m)) break;
    if (auto* plan = std::get_if<messages::StepPlan>(&m)) {
      const auto t0 = std::chrono::steady_clock::now();
      busy_ = true;
      messages::StepResult r = runner_.run(*plan);
      busy_ = false;
      r.step_us = static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
      if (opt_.tp_rank == 0) transport_.send(opt_.coordinator_rank, messages::encode(r));
      continue;
    }
    log::warn("worker: ignoring ", messages::type_name(m));
  }
  done = true;
  beat.join();
  inbox_.close();
  transport_.stop();
}

}  // namespace quilt
