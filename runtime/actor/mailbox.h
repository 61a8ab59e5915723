#pragma once
// A multi-producer, single-consumer queue: the one way into an actor. Producers never block
// on the consumer; the consumer blocks until a message arrives, a deadline passes, or the
// mailbox is closed.
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>

namespace quilt {

template <typename T>
class Mailbox {
 public:
  // False when the mailbox is closed (the message is dropped).
  bool post(T msg) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_) return false;
      q_.push_back(std::move(msg));
    }
    cv_.notify_one();
    return true;
  }

  // Blocks until a message or close(); nullopt once closed and drained.
  std::optional<T> pop() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !q_.empty() || closed_; });
    return take(lk);
  }

  // As pop(), but gives up at the deadline.
  std::optional<T> pop_until(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait_until(lk, deadline, [&] { return !q_.empty() || closed_; });
    return take(lk);
  }

  std::optional<T> try_pop() {
    std::unique_lock<std::mutex> lk(mu_);
    return take(lk);
  }

  void close() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      closed_ = true;
    }
    cv_.notify_all();
  }

  bool closed() const {
    std::lock_guard<std::mutex> lk(mu_);
    return closed_;
  }
  size_t size() const {
    std::lock_guard<std::mutex> lk(mu_);
    return q_.size();
  }

 private:
  std::optional<T> take(std::unique_lock<std::mutex>&) {
    if (q_.empty()) return std::nullopt;
    T m = std::move(q_.front());
    q_.pop_front();
    return m;
  }
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> q_;
  bool closed_ = false;
};

}  // namespace quilt
