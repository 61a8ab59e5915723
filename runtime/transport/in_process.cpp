#include <atomic>
#include <thread>

#include "runtime/actor/mailbox.h"
#include "runtime/core/check.h"
#include "runtime/transport/transport.h"

namespace quilt {
namespace {

struct Packet {
  int src;
  Bytes bytes;
};

// Each endpoint delivers on a thread of its own, as the MPI transport does, so that receivers
// see the same threading in tests as in the job.
class InProcessEndpoint final : public Transport {
 public:
  InProcessEndpoint(int rank, std::vector<std::unique_ptr<InProcessEndpoint>>& peers)
      : rank_(rank), peers_(peers) {}
  ~InProcessEndpoint() override { stop(); }

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(peers_.size()); }
  void start(Receiver receiver) override {
    QUILT_ASSERT(!thread_.joinable(), "transport started twice");
    receiver_ = std::move(receiver);
    thread_ = std::thread([this] {
      while (auto p = inbox_.pop()) receiver_(p->src, std::move(p->bytes));
    });
  }
  void send(int dst, Bytes bytes) override {
    QUILT_REQUIRE(dst >= 0 && dst < size(), "transport: no rank ", dst, " in a job of ", size());
    peers_[dst]->inbox_.post(Packet{rank_, std::move(bytes)});
  }
  void stop() override {
    inbox_.close();
    if (thread_.joinable()) thread_.join();
  }

 private:
  int rank_;
  std::vector<std::unique_ptr<InProcessEndpoint>>& peers_;
  Mailbox<Packet> inbox_;
  Receiver receiver_;
  std::thread thread_;
};

}  // namespace

struct InProcessNetwork::Impl {
  std::vector<std::unique_ptr<InProcessEndpoint>> endpoints;
};

InProcessNetwork::InProcessNetwork(int size) : impl_(std::make_unique<Impl>()) {
  QUILT_REQUIRE(size >= 1, "in-process network needs at least one rank");
  for (int r = 0; r < size; ++r) impl_->endpoints.push_back(std::make_unique<InProcessEndpoint>(r, impl_->endpoints));
}

InProcessNetwork::~InProcessNetwork() {
  for (auto& e : impl_->endpoints) e->stop();
}

Transport& InProcessNetwork::endpoint(int rank) { return *impl_->endpoints.at(rank); }
int InProcessNetwork::size() const { return static_cast<int>(impl_->endpoints.size()); }

}  // namespace quilt
