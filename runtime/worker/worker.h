#pragma once
// A worker rank's actor: plans arrive through the transport into a mailbox, the rank's thread
// runs them on its ModelRunner, and the replica's first rank answers the coordinator. A small
// thread sends heartbeats so that the coordinator sees the worker even during long steps.
#include <atomic>
#include <chrono>
#include <memory>
#include <variant>

#include "runtime/actor/mailbox.h"
#include "runtime/transport/transport.h"
#include "runtime/worker/model_runner.h"

namespace quilt {

struct WorkerOptions {
  int replica = 0;
  int tp_rank = 0;            // 0 answers the coordinator
  int coordinator_rank = 0;
  double heartbeat_interval_s = 1.0;
};

// Adapter loads read from disk on a loader thread (steps go on meanwhile) and are installed into
// their slot on the worker's thread between steps; every rank answers AdapterLoaded.
class Worker {
 public:
  Worker(ModelRunner& runner, Transport& transport, WorkerOptions opt, AdapterStore* adapters = nullptr);
  // Runs until a Shutdown message arrives (or the transport's peer disappears); returns then.
  void run();

 private:
  struct Read {  // a finished disk read, to install
    messages::LoadAdapter req;
    std::shared_ptr<const HostLoraAdapter> adapter;
    std::string error;
    std::chrono::steady_clock::time_point started;
  };
  void heartbeat(uint64_t seq);
  void on_load(const messages::LoadAdapter& m);
  void on_read(Read& r);
  ModelRunner& runner_;
  Transport& transport_;
  WorkerOptions opt_;
  AdapterStore* adapters_;
  Mailbox<std::variant<Bytes, Read>> inbox_;
  Mailbox<messages::LoadAdapter> loads_;
  std::atomic<bool> busy_{false};
};

}  // namespace quilt
