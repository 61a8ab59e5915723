#include "runtime/coordinator/coordinator.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/check.h"
#include "runtime/core/log.h"

namespace quilt {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::length: return "length";
    case FinishReason::eos_token: return "eos_token";
    case FinishReason::stop_sequence: return "stop_sequence";
  }
  return "?";
}

namespace {
constexpr auto kTick = std::chrono::milliseconds(100);
std::string rows_bucket(size_t n) {
  for (size_t b : {1, 2, 4, 8, 16, 32, 64, 128, 256})
    if (n <= b) return "<=" + std::to_string(b);
  return ">256";
}
double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

Coordinator::Coordinator(const ServeConfig& cfg, const Tokenizer& tok, Transport& transport,
                         std::vector<int> eos_ids, Metrics& metrics)
    : cfg_(cfg), tok_(tok), transport_(transport), eos_(std::move(eos_ids)), metrics_(metrics),
      placement_(PlacementConfig{parse_placement_policy(cfg.placement), cfg.adapter_overload_slack}) {
  QUILT_REQUIRE(transport.size() == cfg.world_size(), "the job has ", transport.size(),
                " ranks but the config needs 1 + replicas (", cfg.replicas, ") x tensor_parallel (",
                cfg.tensor_parallel, ") = ", cfg.world_size());
  SchedulerConfig sc;
  sc.block_size = cfg.block_size;
  sc.num_blocks = cfg.effective_kv_blocks();
  sc.max_batch_prefill_tokens = cfg.max_batch_prefill_tokens;
  sc.max_batch_total_tokens = cfg.max_batch_total_tokens;
  sc.max_running_requests = cfg.max_running_requests;
  sc.waiting_served_ratio = cfg.waiting_served_ratio;
  sc.max_waiting_tokens = cfg.max_waiting_tokens;
  // The base model takes no adapter slot; more active adapters than slots would never look full,
  // so nothing would cycle out and a waiting adapter could starve.
  sc.max_active_adapters = std::max(1, std::min(cfg.max_active_adapters, cfg.adapter_slots));
  sc.adapter_cycle_time_s = cfg.adapter_cycle_time_s;
  replicas_.resize(cfg.replicas);
  for (auto& r : replicas_) {
    r.sched = std::make_unique<Scheduler>(sc);
    r.slot_owner.assign(cfg.adapter_slots, "");
  }
  sources_.roots = cfg.adapter_roots;
  sources_.hub_cache = cfg.adapter_hub_cache;
  last_seen_.assign(cfg.world_size(), Clock::time_point{});
  status_.workers_total = cfg.world_size() - 1;
  status_.kv_blocks_total.assign(cfg.replicas, sc.num_blocks);
  status_.kv_blocks_used.assign(cfg.replicas, 0);
}

Coordinator::~Coordinator() { shutdown(); }

void Coordinator::start() {
  transport_.start([this](int src, Bytes b) { mailbox_.post(Incoming{src, std::move(b)}); });
  // adapters.preload: on every replica, before any request (resolution errors stop the start).
  for (const std::string& id : cfg_.adapter_preload) {
    ResolvedAdapter ra;
    try {
      ra = resolve_adapter(id, "", sources_);
    } catch (const AdapterResolveError& e) {
      QUILT_FAIL("adapters.preload: ", e.what());
    }
    id_of_[ra.path] = id;
    for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) {
      Replica& rep = replicas_[r];
      const auto free = std::find(rep.slot_owner.begin(), rep.slot_owner.end(), "");
      QUILT_ASSERT(free != rep.slot_owner.end());  // the config checks preload <= slots
      start_load(r, ra.path, id, static_cast<int>(free - rep.slot_owner.begin()));
    }
  }
  next_tick_ = Clock::now() + kTick;
  thread_ = std::thread([this] { loop(); });
}

uint64_t Coordinator::submit(GenerateRequest req, std::shared_ptr<RequestSink> sink) {
  const uint64_t id = next_id_++;
  if (!mailbox_.post(Submit{id, std::move(req), sink, Clock::now()}))
    sink->on_error(ApiError{503, "unavailable", "the server is shutting down"});
  return id;
}

void Coordinator::cancel(uint64_t id) { mailbox_.post(Cancel{id}); }

void Coordinator::shutdown() {
  if (stopped_.exchange(true)) return;
  mailbox_.post(Stop{});
  if (thread_.joinable()) thread_.join();
  mailbox_.close();
  // Fail what is left after the thread has stopped (nothing else touches live_ now).
  while (auto e = mailbox_.try_pop())
    if (auto* s = std::get_if<Submit>(&*e)) s->sink->on_error(ApiError{503, "unavailable", "the server is shutting down"});
  transport_.stop();
}

CoordinatorStatus Coordinator::status() const {
  std::lock_guard<std::mutex> lk(status_mu_);
  return status_;
}

void Coordinator::loop() {
  for (;;) {
    auto ev = mailbox_.pop_until(next_tick_);
    if (ev) {
      if (std::holds_alternative<Stop>(*ev)) break;
      std::visit([this](auto& e) {
        using T = std::decay_t<decltype(e)>;
        if constexpr (!std::is_same_v<T, Stop>) handle(e);
      }, *ev);
      // Drain what else is queued before planning, so one plan sees every arrival.
      bool stop = false;
      while (auto more = mailbox_.try_pop()) {
        if (std::holds_alternative<Stop>(*more)) {
          stop = true;
          break;
        }
        std::visit([this](auto& e) {
          using T = std::decay_t<decltype(e)>;
          if constexpr (!std::is_same_v<T, Stop>) handle(e);
        }, *more);
      }
      if (stop) break;
    }
    if (Clock::now() >= next_tick_) {
      tick();
      next_tick_ = Clock::now() + kTick;
    }
    for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) {
      manage_adapters(r);
      schedule(r);
    }
  }
  for (auto it = live_.begin(); it != live_.end();) {
    it->second.sink->on_error(ApiError{503, "unavailable", "the server is shutting down"});
    it = live_.erase(it);
  }
  const Bytes bye = messages::encode(messages::Shutdown{"coordinator shutting down"});
  for (int rank = 1; rank < transport_.size(); ++rank) transport_.send(rank, bye);
  publish_status();
}

double Coordinator::now_s() const { return std::chrono::duration<double>(Clock::now() - epoch_).count(); }

// Placement (adapters.placement, runtime/scheduler/placement.h) on a snapshot of the replicas.
int Coordinator::pick_replica(const std::string& key) {
  std::vector<ReplicaView> views(replicas_.size());
  for (size_t r = 0; r < replicas_.size(); ++r) {
    const Replica& rep = replicas_[r];
    ReplicaView& v = views[r];
    v.waiting = rep.sched->num_waiting();
    v.running = rep.sched->num_running();
    for (const auto& [k, a] : rep.adapters) (a.state == AdapterOnReplica::State::resident ? v.resident : v.loading).insert(k);
    for (const auto& owner : rep.slot_owner)
      if (owner.empty() || (rep.adapters.count(owner) && rep.adapters.at(owner).state == AdapterOnReplica::State::resident &&
                            rep.sched->idle(owner)))
        ++v.free_adapter_slots;
  }
  return placement_.place(key, views).replica;
}

void Coordinator::handle(Submit& s) {
  if (static_cast<int>(live_.size()) >= cfg_.max_concurrent_requests) {
    s.sink->on_error(ApiError{429, "overloaded", "Model is overloaded: " + std::to_string(live_.size()) +
                                                     " requests in progress (http.max_concurrent_requests)"});
    metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", "overloaded"}});
    return;
  }
  std::string key;
  if (!s.req.adapter.empty()) {
    auto refuse = [&](int status, const std::string& type, const std::string& msg) {
      s.sink->on_error(ApiError{status, type, msg});
      metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", type}});
    };
    if (cfg_.adapter_slots == 0)
      return refuse(400, "validation", "adapter '" + s.req.adapter + "': adapters are disabled (adapters.slots is 0)");
    try {
      key = resolve_adapter(s.req.adapter, s.req.adapter_source, sources_).path;
    } catch (const AdapterResolveError& e) {
      return refuse(e.status, e.status == 404 ? "not_found" : "validation", e.what());
    }
    if (auto f = failed_.find(key); f != failed_.end()) {
      const double age = seconds(Clock::now() - f->second.first);
      if (age < cfg_.adapter_retry_backoff_s)
        return refuse(424, "adapter_load", "adapter '" + s.req.adapter + "' failed to load " + std::to_string(static_cast<int>(age)) +
                                               " s ago: " + f->second.second + " (retried after adapters.retry_backoff_s = " +
                                               std::to_string(static_cast<int>(cfg_.adapter_retry_backoff_s)) + " s)");
      failed_.erase(f);
    }
    id_of_[key] = s.req.adapter;
  }
  const int r = pick_replica(key);
  Request sr;
  sr.id = s.id;
  sr.prompt_tokens = static_cast<int32_t>(s.req.prompt_ids.size());
  sr.max_new_tokens = s.req.sampling.max_new_tokens;
  sr.adapter = key;
  const SubmitResult res = replicas_[r].sched->submit(sr);
  if (!res.ok()) {
    s.sink->on_error(ApiError{422, "validation", res.reason});
    metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", "validation"}});
    return;
  }
  Live live;
  live.req = std::move(s.req);
  live.sink = std::move(s.sink);
  live.replica = r;
  live.adapter_key = key;
  live.detok = std::make_unique<IncrementalDetokenizer>(tok_, live.req.prompt_ids);
  live.stops = std::make_unique<StopMatcher>(live.req.stop);
  live.arrival = s.arrival;
  metrics_.inc("quilt_requests_total", 1, {{"route", live.req.route.empty() ? "generate" : live.req.route}});
  metrics_.inc("quilt_adapter_requests_total", 1, {{"adapter", live.req.adapter.empty() ? "base" : live.req.adapter}});
  if (!key.empty() && !replicas_[r].adapters.count(key) && !replicas_[r].sched->is_ready(key))
    metrics_.inc("quilt_adapter_cold_requests_total", 1, {{"adapter", live.req.adapter}});
  live_.emplace(s.id, std::move(live));
}

void Coordinator::handle(const Cancel& c) {
  auto it = live_.find(c.id);
  if (it == live_.end()) return;
  metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", "cancelled"}});
  drop(c.id, it->second);
  live_.erase(it);
}

void Coordinator::drop(uint64_t id, Live& live) {
  Replica& rep = replicas_[live.replica];
  rep.sched->cancel(id);
  if (live.prefilled) rep.release.push_back(id);
}

void Coordinator::handle(Incoming& in) {
  messages::Message m;
  try {
    m = messages::decode(in.bytes);
  } catch (const std::exception& e) {
    log::error("coordinator: dropped a corrupt message from rank ", in.src, ": ", e.what());
    return;
  }
  if (auto* hb = std::get_if<messages::Heartbeat>(&m)) {
    if (hb->rank > 0 && hb->rank < static_cast<int>(last_seen_.size())) {
      last_seen_[hb->rank] = Clock::now();
    }
    return;
  }
  if (auto* r = std::get_if<messages::StepResult>(&m)) {
    on_result(*r);
    return;
  }
  if (auto* a = std::get_if<messages::AdapterLoaded>(&m)) {
    on_loaded(*a);
    return;
  }
  log::warn("coordinator: unexpected ", messages::type_name(m), " from rank ", in.src);
}

void Coordinator::schedule(int r) {
  Replica& rep = replicas_[r];
  if (rep.in_flight) return;
  const StepPlan sp = rep.sched->next_step(now_s());
  if (sp.empty()) return;  // releases wait for the next plan
  messages::StepPlan plan;
  plan.step_id = ++rep.step_id;
  plan.release = std::move(rep.release);
  rep.release.clear();
  rep.plan_ids.clear();
  const auto now = Clock::now();
  for (const PrefillEntry& p : sp.prefill) {
    Live& live = live_.at(p.id);
    messages::ScheduledSequence s;
    s.request_id = p.id;
    s.kind = messages::RowKind::kPrefill;
    s.input_tokens.assign(live.req.prompt_ids.begin(), live.req.prompt_ids.end());
    s.start_pos = 0;
    s.num_new_tokens = static_cast<int32_t>(live.req.prompt_ids.size());
    s.block_table = p.blocks;
    s.needs_sample = true;
    s.sampling = live.req.sampling;
    if (!live.adapter_key.empty()) {
      auto& a = rep.adapters.at(live.adapter_key);
      s.adapter_slot = a.slot;
      a.last_used = now;
    }
    live.prefilled = true;
    live.scheduled = now;
    live.context = s.num_new_tokens;
    metrics_.observe("quilt_request_queue_duration_seconds", seconds(now - live.arrival));
    metrics_.inc("quilt_prompt_tokens_total", s.num_new_tokens);
    plan.sequences.push_back(std::move(s));
    rep.plan_ids.push_back(p.id);
  }
  for (uint64_t id : sp.decode) {
    Live& live = live_.at(id);
    messages::ScheduledSequence s;
    s.request_id = id;
    s.kind = messages::RowKind::kDecode;
    s.start_pos = live.context;
    s.num_new_tokens = 1;
    const auto table = rep.sched->block_table(id);
    s.block_table.assign(table.begin(), table.end());
    s.needs_sample = true;
    if (!live.adapter_key.empty()) {
      auto& a = rep.adapters.at(live.adapter_key);
      s.adapter_slot = a.slot;
      a.last_used = now;
    }
    live.context += 1;
    plan.sequences.push_back(std::move(s));
    rep.plan_ids.push_back(id);
  }
  metrics_.observe("quilt_batch_size", static_cast<double>(plan.sequences.size()));
  const Bytes bytes = messages::encode(plan);
  const int first = 1 + r * cfg_.tensor_parallel;
  for (int k = 0; k < cfg_.tensor_parallel; ++k) transport_.send(first + k, bytes);
  const auto sent = Clock::now();
  // Back-to-back steps (this plan follows the previous result at once): the cycle minus the
  // worker's time is the coordinator's overhead per step, by the number of rows.
  if (rep.last_worker_s >= 0 && !sp.decode.empty() && rep.rows_last > 0)
    metrics_.observe("quilt_step_overhead_seconds", std::max(0.0, seconds(sent - rep.sent) - rep.last_worker_s),
                     {{"rows", rows_bucket(rep.rows_last)}});
  rep.rows_last = plan.sequences.size();
  rep.last_worker_s = -1;
  rep.in_flight = true;
  rep.sent = sent;
}

void Coordinator::on_result(messages::StepResult& res) {
  if (res.replica < 0 || res.replica >= static_cast<int>(replicas_.size())) return;
  Replica& rep = replicas_[res.replica];
  if (!rep.in_flight || res.step_id != rep.step_id) {
    log::warn("coordinator: stale result for step ", res.step_id, " of replica ", res.replica);
    return;
  }
  rep.in_flight = false;
  const auto now = Clock::now();
  metrics_.observe("quilt_step_duration_seconds", seconds(now - rep.sent));
  // What the step cost beyond the worker's own wall time: transport, codec and the coordinator's
  // planning (measured from the previous plan's departure to this one's, in schedule()).
  rep.last_worker_s = static_cast<double>(res.step_us) * 1e-6;
  if (!res.error.empty()) {
    log::error("replica ", res.replica, " failed step ", res.step_id, ": ", res.error);
    for (uint64_t id : rep.plan_ids) {
      auto it = live_.find(id);
      if (it == live_.end()) continue;
      fail(id, it->second, ApiError{424, "generation", "the model failed this step: " + res.error});
      live_.erase(it);
    }
    return;
  }
  for (auto& o : res.sequences) {
    auto it = live_.find(o.request_id);
    if (it == live_.end()) continue;  // cancelled while the step ran
    Live& live = it->second;
    if (!o.prompt_logprobs.empty())
      live.prompt_logprobs.insert(live.prompt_logprobs.end(), o.prompt_logprobs.begin(), o.prompt_logprobs.end());
    if (!o.token) continue;
    TokenEvent t;
    t.id = o.token->id;
    t.logprob = o.token->logprob;
    t.special = tok_.is_special(t.id);
    t.alternatives = o.alternatives;
    const bool eos = o.finished_by_eos && !live.req.ignore_eos_token;
    const size_t before = live.detok->text().size();
    t.text = live.detok->push(t.id);
    if (live.tokens.empty()) {
      live.first_token = now;
      metrics_.observe("quilt_request_ttft_seconds", seconds(now - live.arrival));
    }
    live.tokens.push_back(t);
    metrics_.inc("quilt_generated_tokens_total");
    metrics_.inc("quilt_adapter_generated_tokens_total", 1, {{"adapter", live.req.adapter.empty() ? "base" : live.req.adapter}});
    const size_t stop_at = live.stops->find(live.detok->text(), live.detok->text().size() - before);
    const bool length = static_cast<int>(live.tokens.size()) >= live.req.sampling.max_new_tokens;
    live.tokens.back().last = t.last = eos || stop_at != std::string::npos || length;
    live.sink->on_token(t);
    if (eos) {
      finish(o.request_id, live, FinishReason::eos_token, std::string::npos);
    } else if (stop_at != std::string::npos) {
      finish(o.request_id, live, FinishReason::stop_sequence, stop_at);
    } else if (length) {
      finish(o.request_id, live, FinishReason::length, std::string::npos);
    } else {
      continue;
    }
    live_.erase(o.request_id);
  }
}

void Coordinator::finish(uint64_t id, Live& live, FinishReason reason, size_t stop_at) {
  const auto now = Clock::now();
  live.detok->flush();
  FinishEvent f;
  f.reason = reason;
  f.generated_text = live.detok->text();
  if (stop_at != std::string::npos) {
    // The text up to the end of the matched stop sequence.
    for (const auto& s : live.req.stop)
      if (f.generated_text.compare(stop_at, s.size(), s) == 0) {
        f.generated_text.resize(stop_at + s.size());
        break;
      }
  }
  f.stop_at = stop_at;
  f.prompt_tokens = static_cast<int>(live.req.prompt_ids.size());
  f.generated_tokens = static_cast<int>(live.tokens.size());
  f.seed = live.req.sampling.seed;
  f.sampled = live.req.sampling.do_sample;
  f.prompt_logprobs = std::move(live.prompt_logprobs);
  f.tokens = std::move(live.tokens);
  f.queue_s = seconds(live.scheduled - live.arrival);
  f.ttft_s = seconds(live.first_token - live.arrival);
  f.total_s = seconds(now - live.arrival);
  metrics_.observe("quilt_request_duration_seconds", f.total_s);
  if (f.generated_tokens > 1)
    metrics_.observe("quilt_request_time_per_output_token_seconds",
                     seconds(now - live.first_token) / (f.generated_tokens - 1));
  metrics_.inc("quilt_requests_finished_total", 1, {{"finish_reason", finish_reason_name(reason)}});
  Replica& rep = replicas_[live.replica];
  rep.sched->finish(id);
  rep.release.push_back(id);
  live.sink->on_finish(f);
}

void Coordinator::fail(uint64_t id, Live& live, const ApiError& e) {
  metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", e.type}});
  drop(id, live);
  live.sink->on_error(e);
}

void Coordinator::start_load(int r, const std::string& key, const std::string& id, int slot) {
  Replica& rep = replicas_[r];
  AdapterOnReplica a;
  a.id = id;
  a.slot = slot;
  a.load_id = next_load_id_++;
  a.acks_left = cfg_.tensor_parallel;
  a.started = a.last_used = Clock::now();
  rep.slot_owner[slot] = key;
  const Bytes bytes = messages::encode(messages::LoadAdapter{a.load_id, id, key, slot});
  rep.adapters[key] = std::move(a);
  const int first = 1 + r * cfg_.tensor_parallel;
  for (int k = 0; k < cfg_.tensor_parallel; ++k) transport_.send(first + k, bytes);
  metrics_.inc("quilt_adapter_loads_total", 1, {{"replica", std::to_string(r)}});
  log::info("replica ", r, ": loading adapter '", id, "' into slot ", slot);
}

void Coordinator::evict(int r, const std::string& key) {
  Replica& rep = replicas_[r];
  auto it = rep.adapters.find(key);
  if (it == rep.adapters.end()) return;
  const int slot = it->second.slot;
  rep.sched->set_ready(key, false);
  rep.slot_owner[slot] = "";
  if (it->second.state == AdapterOnReplica::State::resident)
    metrics_.set("quilt_adapter_resident", 0, {{"adapter", it->second.id}, {"replica", std::to_string(r)}});
  const Bytes bytes = messages::encode(messages::EvictAdapter{it->second.id, slot});
  const int first = 1 + r * cfg_.tensor_parallel;
  for (int k = 0; k < cfg_.tensor_parallel; ++k) transport_.send(first + k, bytes);
  rep.adapters.erase(it);
}

// Starts loads for the adapters this replica's queue wants, oldest request first, evicting the
// least recently used idle adapter when no slot is free; never one that a request uses.
void Coordinator::manage_adapters(int r) {
  Replica& rep = replicas_[r];
  if (rep.slot_owner.empty()) return;
  for (const std::string& key : rep.sched->wanted_adapters()) {
    if (rep.adapters.count(key)) continue;  // loading already
    auto free = std::find(rep.slot_owner.begin(), rep.slot_owner.end(), "");
    if (free == rep.slot_owner.end()) {
      std::string victim;
      Clock::time_point oldest = Clock::time_point::max();
      for (const auto& [k, a] : rep.adapters)
        if (a.state == AdapterOnReplica::State::resident && rep.sched->idle(k) && a.last_used < oldest) {
          oldest = a.last_used;
          victim = k;
        }
      if (victim.empty()) {
        // No idle adapter: give up the slot of a resident adapter with nothing running whose
        // queue comes after the wanted one in the scheduler's line, so that no adapter starves.
        const auto line = rep.sched->pending_adapters();
        const auto pos = [&](const std::string& k) { return std::find(line.begin(), line.end(), k) - line.begin(); };
        for (auto it = line.rbegin(); it != line.rend(); ++it) {
          const auto a = rep.adapters.find(*it);
          if (a != rep.adapters.end() && a->second.state == AdapterOnReplica::State::resident &&
              rep.sched->running_for(*it) == 0 && pos(*it) > pos(key)) {
            victim = *it;
            break;
          }
        }
      }
      if (victim.empty()) return;  // every slot is in use: wait for one to free up
      log::info("replica ", r, ": evicting adapter '", rep.adapters[victim].id, "'");
      metrics_.inc("quilt_adapter_evictions_total", 1, {{"replica", std::to_string(r)}});
      evict(r, victim);
      free = std::find(rep.slot_owner.begin(), rep.slot_owner.end(), "");
    }
    start_load(r, key, id_of_.count(key) ? id_of_[key] : key, static_cast<int>(free - rep.slot_owner.begin()));
  }
}

void Coordinator::on_loaded(const messages::AdapterLoaded& m) {
  const int r = (m.rank - 1) / cfg_.tensor_parallel;
  if (m.rank < 1 || r >= static_cast<int>(replicas_.size())) return;
  Replica& rep = replicas_[r];
  if (m.slot < 0 || m.slot >= static_cast<int>(rep.slot_owner.size())) return;
  const std::string key = rep.slot_owner[m.slot];
  auto it = rep.adapters.find(key);
  if (key.empty() || it == rep.adapters.end() || it->second.load_id != m.request_id) return;  // stale
  AdapterOnReplica& a = it->second;
  if (!m.ok && a.error.empty()) a.error = m.error;
  if (--a.acks_left > 0) return;
  const double secs = seconds(Clock::now() - a.started);
  if (a.error.empty()) {
    a.state = AdapterOnReplica::State::resident;
    rep.sched->set_ready(key, true);
    metrics_.observe("quilt_adapter_load_duration_seconds", secs, {{"adapter", a.id}});
    log::info("replica ", r, ": adapter '", a.id, "' resident in slot ", a.slot, " after ", secs, " s");
    return;
  }
  // Failed: only this adapter's requests fail; it is retried after the back-off.
  const std::string id = a.id, error = a.error;
  log::error("replica ", r, ": adapter '", id, "' failed to load: ", error);
  metrics_.inc("quilt_adapter_load_failures_total", 1, {{"adapter", id}});
  failed_[key] = {Clock::now(), error};
  for (uint64_t rid : rep.sched->waiting_ids(key)) {
    auto l = live_.find(rid);
    if (l == live_.end()) continue;
    fail(rid, l->second, ApiError{424, "adapter_load", "adapter '" + id + "' could not be loaded: " + error});
    live_.erase(l);
  }
  evict(r, key);  // some ranks may hold half of it
}

// Worker ranks whose last heartbeat is within health.heartbeat_timeout_s (never heard: down).
int Coordinator::workers_up() const {
  const auto now = Clock::now();
  const auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.heartbeat_timeout_s));
  int up = 0;
  for (int rank = 1; rank < static_cast<int>(last_seen_.size()); ++rank)
    if (last_seen_[rank] != Clock::time_point{} && now - last_seen_[rank] <= timeout) ++up;
  return up;
}

void Coordinator::tick() {
  metrics_.set("quilt_workers_up", workers_up());
  for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) {
    const auto& s = *replicas_[r].sched;
    const Labels l{{"replica", std::to_string(r)}};
    metrics_.set("quilt_queue_size", static_cast<double>(s.num_waiting()), l);
    metrics_.set("quilt_running_requests", static_cast<double>(s.num_running()), l);
    metrics_.set("quilt_kv_blocks_used", s.used_blocks(), l);
    metrics_.set("quilt_kv_blocks_total", s.used_blocks() + s.free_blocks(), l);
    size_t resident = 0;
    for (const auto& [k, a] : replicas_[r].adapters) {
      const bool res = a.state == AdapterOnReplica::State::resident;
      resident += res;
      if (res) metrics_.set("quilt_adapter_resident", 1, {{"adapter", a.id}, {"replica", std::to_string(r)}});
    }
    metrics_.set("quilt_adapters_resident", static_cast<double>(resident), l);
  }
  publish_status();
}

void Coordinator::publish_status() {
  CoordinatorStatus st;
  st.workers_total = static_cast<int>(last_seen_.size()) - 1;
  st.workers_up = workers_up();
  st.healthy = !stopped_ && st.workers_up == st.workers_total;
  st.live_requests = live_.size();
  for (int ri = 0; ri < static_cast<int>(replicas_.size()); ++ri)
    for (const auto& [key, a] : replicas_[ri].adapters)
      st.adapters.push_back({a.id, key, a.state == AdapterOnReplica::State::resident ? "resident" : "loading", ri, a.slot});
  for (const auto& r : replicas_) {
    st.waiting += r.sched->num_waiting();
    st.running += r.sched->num_running();
    st.kv_blocks_used.push_back(r.sched->used_blocks());
    st.kv_blocks_total.push_back(r.sched->used_blocks() + r.sched->free_blocks());
  }
  std::lock_guard<std::mutex> lk(status_mu_);
  status_ = std::move(st);
}

}  // namespace quilt
