// Under mpiexec -np 3: every rank sends to every other rank, small and large messages, and
// checks per-pair order and content.
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#include "runtime/transport/mpi_transport.h"

using namespace quilt;

TEST(MpiTransport, AllToAllInOrderSmallAndLarge) {
  MpiTransport t(MPI_COMM_WORLD);
  const int n = t.size(), me = t.rank();
  constexpr int kPerPeer = 200;
  std::mutex mu;
  std::vector<std::vector<Bytes>> got(n);
  std::atomic<int> count{0};
  t.start([&](int src, Bytes b) {
    std::lock_guard<std::mutex> lk(mu);
    got[src].push_back(std::move(b));
    ++count;
  });
  for (int i = 0; i < kPerPeer; ++i)
    for (int dst = 0; dst < n; ++dst) {
      if (dst == me) continue;
      // every 50th message is 4 MiB, past the eager limit
      Bytes b(i % 50 == 0 ? (4u << 20) : 16u, static_cast<uint8_t>(i));
      b[0] = static_cast<uint8_t>(me);
      t.send(dst, std::move(b));
    }
  const int expect = kPerPeer * (n - 1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (count < expect && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(count.load(), expect);
  for (int src = 0; src < n; ++src) {
    if (src == me) continue;
    ASSERT_EQ(got[src].size(), static_cast<size_t>(kPerPeer));
    for (int i = 0; i < kPerPeer; ++i) {
      const Bytes& b = got[src][i];
      EXPECT_EQ(b.size(), i % 50 == 0 ? (4u << 20) : 16u);
      EXPECT_EQ(b[0], src);
      EXPECT_EQ(b.back(), static_cast<uint8_t>(i));
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);  // nobody stops before everyone has received everything
  t.stop();
}
