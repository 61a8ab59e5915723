#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <thread>

#include "runtime/actor/mailbox.h"
#include "runtime/core/check.h"
#include "runtime/transport/transport.h"

using namespace quilt;

TEST(Mailbox, FifoCloseAndDeadline) {
  Mailbox<int> m;
  EXPECT_TRUE(m.post(1));
  EXPECT_TRUE(m.post(2));
  EXPECT_EQ(*m.pop(), 1);
  EXPECT_EQ(*m.try_pop(), 2);
  EXPECT_FALSE(m.try_pop().has_value());
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(m.pop_until(t0 + std::chrono::milliseconds(20)).has_value());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(20));
  m.post(3);
  m.close();
  EXPECT_FALSE(m.post(4));         // closed: dropped
  EXPECT_EQ(*m.pop(), 3);          // drained after close
  EXPECT_FALSE(m.pop().has_value());  // and then empty without blocking
}

TEST(Mailbox, ManyProducersLoseNothing) {
  Mailbox<int> m;
  std::vector<std::thread> producers;
  for (int p = 0; p < 4; ++p)
    producers.emplace_back([&, p] {
      for (int i = 0; i < 5000; ++i) m.post(p * 5000 + i);
    });
  std::vector<int> last(4, -1);
  int got = 0;
  while (got < 20000) {
    auto v = m.pop();
    ASSERT_TRUE(v);
    const int p = *v / 5000;
    EXPECT_GT(*v, last[p]);  // per-producer order
    last[p] = *v;
    ++got;
  }
  for (auto& t : producers) t.join();
}

TEST(InProcessTransport, DeliversInOrderWithSourceRank) {
  InProcessNetwork net(3);
  std::mutex mu;
  std::map<int, std::vector<std::pair<int, uint8_t>>> got;  // receiver -> (src, payload)
  std::atomic<int> count{0};
  for (int r = 0; r < 3; ++r)
    net.endpoint(r).start([&, r](int src, Bytes b) {
      std::lock_guard<std::mutex> lk(mu);
      got[r].push_back({src, b.at(0)});
      ++count;
    });
  for (uint8_t i = 0; i < 100; ++i) {
    net.endpoint(1).send(0, {i});
    net.endpoint(2).send(0, {static_cast<uint8_t>(i + 100)});
    net.endpoint(0).send(2, {i});
  }
  for (int i = 0; i < 1000 && count < 300; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(count.load(), 300);
  std::vector<int> from1, from2;
  for (auto [src, v] : got[0]) (src == 1 ? from1 : from2).push_back(v);
  ASSERT_EQ(from1.size(), 100u);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(from1[i], i);
    EXPECT_EQ(from2[i], i + 100);
  }
  EXPECT_EQ(got[2].size(), 100u);
  EXPECT_TRUE(got[1].empty());
  EXPECT_THROW(net.endpoint(0).send(7, {1}), quilt::Error);
}
