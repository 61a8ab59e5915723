#include "runtime/transport/mpi_transport.h"

#include <atomic>
#include <chrono>
#include <list>
#include <thread>

#include "runtime/actor/mailbox.h"
#include "runtime/core/check.h"
#include "runtime/core/log.h"

namespace quilt {
namespace {
constexpr int kTag = 17;
// Longest idle sleep of the polling loop: bounds the latency an idle transport adds.
constexpr auto kMaxIdleSleep = std::chrono::microseconds(200);
// How long stop() waits for sends that no peer receives any more.
constexpr auto kStopGrace = std::chrono::seconds(5);

struct Outgoing {
  int dst;
  Bytes bytes;
};
struct InFlight {
  MPI_Request req;
  Bytes bytes;  // must outlive the request
};
}  // namespace

struct MpiTransport::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  Mailbox<Outgoing> outbox;
  std::list<InFlight> in_flight;
  Receiver receiver;
  std::thread thread;
  std::atomic<bool> stopping{false};

  // One pass: post queued sends, retire finished ones, receive what has arrived. Returns whether
  // anything happened.
  bool pump() {
    bool busy = false;
    while (auto m = outbox.try_pop()) {
      in_flight.push_back({MPI_REQUEST_NULL, std::move(m->bytes)});
      auto& f = in_flight.back();
      MPI_Isend(f.bytes.data(), static_cast<int>(f.bytes.size()), MPI_BYTE, m->dst, kTag, comm, &f.req);
      busy = true;
    }
    for (auto it = in_flight.begin(); it != in_flight.end();) {
      int done = 0;
      MPI_Test(&it->req, &done, MPI_STATUS_IGNORE);
      if (done) {
        it = in_flight.erase(it);
        busy = true;
      } else {
        ++it;
      }
    }
    for (;;) {
      int flag = 0;
      MPI_Status st;
      MPI_Iprobe(MPI_ANY_SOURCE, kTag, comm, &flag, &st);
      if (!flag) break;
      int n = 0;
      MPI_Get_count(&st, MPI_BYTE, &n);
      Bytes b(static_cast<size_t>(n));
      MPI_Recv(b.data(), n, MPI_BYTE, st.MPI_SOURCE, kTag, comm, MPI_STATUS_IGNORE);
      if (receiver) receiver(st.MPI_SOURCE, std::move(b));
      busy = true;
    }
    return busy;
  }

  void loop() {
    auto sleep = std::chrono::microseconds(0);
    while (!stopping.load(std::memory_order_acquire)) {
      if (pump()) {
        sleep = std::chrono::microseconds(0);
      } else {
        sleep = std::min(kMaxIdleSleep, sleep + std::chrono::microseconds(10));
        std::this_thread::sleep_for(sleep);
      }
    }
    // Deliver what was queued before stop(), within a grace period.
    const auto deadline = std::chrono::steady_clock::now() + kStopGrace;
    while ((outbox.size() > 0 || !in_flight.empty()) && std::chrono::steady_clock::now() < deadline) {
      if (!pump()) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (!in_flight.empty()) {
      log::warn("transport: ", in_flight.size(), " message(s) not received by their peer at shutdown");
      for (auto& f : in_flight) {
        MPI_Cancel(&f.req);
        MPI_Request_free(&f.req);
      }
      in_flight.clear();
    }
  }
};

MpiTransport::MpiTransport(MPI_Comm comm) : impl_(std::make_unique<Impl>()) {
  MPI_Comm_dup(comm, &impl_->comm);
  MPI_Comm_rank(impl_->comm, &impl_->rank);
  MPI_Comm_size(impl_->comm, &impl_->size);
}

MpiTransport::~MpiTransport() {
  stop();
  // MPI_Comm_free is collective in spirit and may hang if a peer is gone; the communicator is
  // released by MPI_Finalize instead.
}

int MpiTransport::rank() const { return impl_->rank; }
int MpiTransport::size() const { return impl_->size; }

void MpiTransport::start(Receiver receiver) {
  QUILT_ASSERT(!impl_->thread.joinable(), "transport started twice");
  impl_->receiver = std::move(receiver);
  impl_->thread = std::thread([this] { impl_->loop(); });
}

void MpiTransport::send(int dst, Bytes bytes) {
  QUILT_REQUIRE(dst >= 0 && dst < impl_->size, "transport: no rank ", dst, " in a job of ", impl_->size);
  QUILT_REQUIRE(bytes.size() <= static_cast<size_t>(INT32_MAX), "transport: message of ", bytes.size(),
                " bytes is too large for one MPI send");
  impl_->outbox.post(Outgoing{dst, std::move(bytes)});
}

void MpiTransport::stop() {
  impl_->stopping.store(true, std::memory_order_release);
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace quilt
