#pragma once
// Rank 0's actor: takes requests from the HTTP layer, keeps one scheduler per replica, sends
// each replica's workers the same step plan, and turns step results into tokens, text and
// finished requests. One thread owns all of this state; other threads only post to its mailbox.
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "model/tokenizer.h"
#include "runtime/actor/mailbox.h"
#include "runtime/config/serve_config.h"
#include "runtime/coordinator/adapter_source.h"
#include "runtime/coordinator/detokenizer.h"
#include "runtime/coordinator/metrics.h"
#include "runtime/coordinator/request.h"
#include "runtime/scheduler/placement.h"
#include "runtime/scheduler/scheduler.h"
#include "runtime/transport/transport.h"

namespace quilt {

struct CoordinatorStatus {
  int workers_total = 0;
  int workers_up = 0;
  bool healthy = false;  // every worker heartbeat within the timeout
  size_t waiting = 0, running = 0, live_requests = 0;
  std::vector<int> kv_blocks_used, kv_blocks_total;  // per replica
  std::vector<AdapterStatus> adapters;                // loading or resident, every replica
};

class Coordinator {
 public:
  // The transport's rank 0 is this coordinator; ranks 1.. are workers, replica r owning ranks
  // [1 + r * tp, 1 + (r + 1) * tp), whose first rank answers each step.
  Coordinator(const ServeConfig& cfg, const Tokenizer& tok, Transport& transport,
              std::vector<int> eos_ids, Metrics& metrics);
  ~Coordinator();

  void start();
  // Thread-safe. Events of the request reach `sink` on the coordinator's thread; a request that
  // cannot be accepted gets on_error at once (and still returns its id).
  uint64_t submit(GenerateRequest req, std::shared_ptr<RequestSink> sink);
  // Thread-safe: the client went away. The request ends without another event.
  void cancel(uint64_t id);
  // Sends Shutdown to every worker, fails what is still running, stops the thread. Idempotent.
  void shutdown();
  CoordinatorStatus status() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Submit {
    uint64_t id;
    GenerateRequest req;
    std::shared_ptr<RequestSink> sink;
    Clock::time_point arrival;
  };
  struct Cancel {
    uint64_t id;
  };
  struct Incoming {
    int src;
    Bytes bytes;
  };
  struct Stop {};
  using Event = std::variant<Submit, Cancel, Incoming, Stop>;

  struct Live {
    GenerateRequest req;
    std::string adapter_key;  // the adapter's folder (its identity); "" = base
    std::shared_ptr<RequestSink> sink;
    int replica = 0;
    std::unique_ptr<IncrementalDetokenizer> detok;
    std::unique_ptr<StopMatcher> stops;
    std::vector<TokenEvent> tokens;
    std::vector<float> prompt_logprobs;
    bool prefilled = false;  // its prefill row has been planned
    int context = 0;         // tokens in the KV cache once the in-flight step completes
    Clock::time_point arrival, scheduled, first_token;
  };
  // One adapter's life on one replica: absent (no entry) -> loading -> resident, or failed.
  struct AdapterOnReplica {
    enum class State { loading, resident } state = State::loading;
    std::string id;  // as requests name it
    int slot = -1;
    uint64_t load_id = 0;
    int acks_left = 0;  // AdapterLoaded answers still due from the replica's ranks
    std::string error;  // the first rank's error, if any
    Clock::time_point started, last_used;
  };
  struct Replica {
    std::unique_ptr<Scheduler> sched;
    std::unordered_map<std::string, AdapterOnReplica> adapters;  // by adapter key
    std::vector<std::string> slot_owner;                        // adapter key per slot, "" = free
    bool in_flight = false;
    uint64_t step_id = 0;
    std::vector<uint64_t> release;     // to send with the next plan
    std::vector<uint64_t> plan_ids;    // requests in the in-flight plan
    Clock::time_point sent;
    double last_worker_s = -1;  // the last result's worker wall time; -1 once used
    size_t rows_last = 0;       // rows of the in-flight plan
  };

  void loop();
  void handle(Submit& s);
  void handle(const Cancel& c);
  void handle(Incoming& in);
  void on_result(messages::StepResult& r);
  void schedule(int replica);
  void finish(uint64_t id, Live& live, FinishReason reason, size_t stop_at);
  void fail(uint64_t id, Live& live, const ApiError& e);
  void drop(uint64_t id, Live& live);  // frees the request everywhere
  void tick();
  int pick_replica(const std::string& adapter_key);
  void manage_adapters(int replica);
  void start_load(int replica, const std::string& key, const std::string& id, int slot);
  void evict(int replica, const std::string& key);
  void on_loaded(const messages::AdapterLoaded& m);
  double now_s() const;
  void publish_status();
  int workers_up() const;

  ServeConfig cfg_;
  const Tokenizer& tok_;
  Transport& transport_;
  std::vector<int> eos_;
  Metrics& metrics_;
  Mailbox<Event> mailbox_;
  std::thread thread_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> stopped_{false};
  std::vector<Replica> replicas_;
  std::unordered_map<uint64_t, Live> live_;
  AdapterSourceConfig sources_;
  // Adapters that failed to load: key -> (when, why); requests for them get 424 until the back-off ends.
  std::unordered_map<std::string, std::pair<Clock::time_point, std::string>> failed_;
  std::unordered_map<std::string, std::string> id_of_;  // adapter key -> id, for messages and metrics
  uint64_t next_load_id_ = 1;
  Placement placement_;
  Clock::time_point epoch_ = Clock::now();
  std::vector<Clock::time_point> last_seen_;  // per worker rank (index 0 unused); epoch = never heard
  Clock::time_point next_tick_;
  mutable std::mutex status_mu_;
  CoordinatorStatus status_;
};

}  // namespace quilt
