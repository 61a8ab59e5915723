#include "runtime/worker/worker.h"

#include <thread>

#include "runtime/core/log.h"

namespace quilt {

Worker::Worker(ModelRunner& runner, Transport& transport, WorkerOptions opt, AdapterStore* adapters)
    : runner_(runner), transport_(transport), opt_(opt), adapters_(adapters) {}

void Worker::on_load(const messages::LoadAdapter& m) {
  if (!adapters_) {
    messages::AdapterLoaded r{m.request_id, transport_.rank(), m.name, m.slot, false,
                              "this worker has no adapter slots (adapters.slots is 0)", 0};
    transport_.send(opt_.coordinator_rank, messages::encode(r));
    return;
  }
  loads_.post(m);
}

void Worker::on_read(Read& r) {
  messages::AdapterLoaded out;
  out.request_id = r.req.request_id;
  out.rank = transport_.rank();
  out.name = r.req.name;
  out.slot = r.req.slot;
  out.error = r.error;
  if (r.error.empty()) {
    try {
      adapters_->install(r.req.slot, *r.adapter);
      out.ok = true;
    } catch (const std::exception& e) {
      out.error = e.what();
    }
  }
  out.load_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - r.started).count());
  transport_.send(opt_.coordinator_rank, messages::encode(out));
}

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
  std::thread loader([this] {
    while (auto m = loads_.pop()) {
      Read r{*m, nullptr, "", std::chrono::steady_clock::now()};
      try {
        r.adapter = adapters_->read(m->name, m->path);
      } catch (const std::exception& e) {
        r.error = e.what();
      }
      inbox_.post(std::move(r));
    }
  });
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
  while (auto item = inbox_.pop()) {
    if (auto* r = std::get_if<Read>(&*item)) {
      on_read(*r);
      continue;
    }
    const Bytes& bytes = std::get<Bytes>(*item);
    messages::Message m;
    try {
      m = messages::decode(bytes);
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
    if (auto* load = std::get_if<messages::LoadAdapter>(&m)) {
      on_load(*load);
      continue;
    }
    if (auto* ev = std::get_if<messages::EvictAdapter>(&m)) {
      if (adapters_ && ev->slot < adapters_->num_slots()) adapters_->evict(ev->slot);
      continue;
    }
    log::warn("worker: ignoring ", messages::type_name(m));
  }
  loads_.close();
  loader.join();
  done = true;
  beat.join();
  inbox_.close();
  transport_.stop();
}

}  // namespace quilt
