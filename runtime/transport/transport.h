#pragma once
// Point-to-point byte messages between the ranks of the job (the control plane). The MPI
// transport owns MPI on a thread of its own; the in-process one connects endpoints of one
// process so that actor conversations are testable without MPI.
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace quilt {

using Bytes = std::vector<uint8_t>;
// Called on the transport's thread for every message received; must not block for long.
using Receiver = std::function<void(int src_rank, Bytes bytes)>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Starts delivering incoming messages to `receiver`. Call once, before any send.
  virtual void start(Receiver receiver) = 0;
  // Queues `bytes` for `dst`; thread-safe, never blocks on the peer. Messages from one sender
  // to one receiver arrive in order.
  virtual void send(int dst, Bytes bytes) = 0;
  // Delivers what was queued, then stops the thread. Idempotent.
  virtual void stop() = 0;
};

// `size` connected endpoints in one process: endpoint(r) is rank r.
class InProcessNetwork {
 public:
  explicit InProcessNetwork(int size);
  ~InProcessNetwork();
  Transport& endpoint(int rank);
  int size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace quilt
