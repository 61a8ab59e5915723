#pragma once
// A worker rank's actor: plans arrive through the transport into a mailbox, the rank's thread
// runs them on its ModelRunner, and the replica's first rank answers the coordinator. A small
// thread sends heartbeats so that the coordinator sees the worker even during long steps.
#include <atomic>
#include <chrono>

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

class Worker {
 public:
  Worker(ModelRunner& runner, Transport& transport, WorkerOptions opt);
  // Runs until a Shutdown message arrives (or the transport's peer disappears); returns then.
  void run();

 private:
  void heartbeat(uint64_t seq);
  ModelRunner& runner_;
  Transport& transport_;
  WorkerOptions opt_;
  Mailbox<Bytes> inbox_;
  std::atomic<bool> busy_{false};
};

}  // namespace quilt
