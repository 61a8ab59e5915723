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
double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

Coordinator::Coordinator(const ServeConfig& cfg, const Tokenizer& tok, Transport& transport,
                         std::vector<int> eos_ids, Metrics& metrics)
    : cfg_(cfg), tok_(tok), transport_(transport), eos_(std::move(eos_ids)), metrics_(metrics) {
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
  replicas_.resize(cfg.replicas);
  for (auto& r : replicas_) r.sched = std::make_unique<Scheduler>(sc);
  last_seen_.assign(cfg.world_size(), Clock::time_point{});
  seen_.assign(cfg.world_size(), false);
  status_.workers_total = cfg.world_size() - 1;
  status_.kv_blocks_total.assign(cfg.replicas, sc.num_blocks);
  status_.kv_blocks_used.assign(cfg.replicas, 0);
}

Coordinator::~Coordinator() { shutdown(); }

void Coordinator::start() {
  transport_.start([this](int src, Bytes b) { mailbox_.post(Incoming{src, std::move(b)}); });
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
    for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) schedule(r);
  }
  for (auto it = live_.begin(); it != live_.end();) {
    it->second.sink->on_error(ApiError{503, "unavailable", "the server is shutting down"});
    it = live_.erase(it);
  }
  const Bytes bye = messages::encode(messages::Shutdown{"coordinator shutting down"});
  for (int rank = 1; rank < transport_.size(); ++rank) transport_.send(rank, bye);
  publish_status();
}

int Coordinator::pick_replica() const {
  int best = 0;
  size_t load = SIZE_MAX;
  for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) {
    const auto& s = *replicas_[r].sched;
    const size_t l = s.num_waiting() + s.num_running();
    if (l < load) load = l, best = r;
  }
  return best;
}

void Coordinator::handle(Submit& s) {
  if (static_cast<int>(live_.size()) >= cfg_.max_concurrent_requests) {
    s.sink->on_error(ApiError{429, "overloaded", "Model is overloaded: " + std::to_string(live_.size()) +
                                                     " requests in progress (http.max_concurrent_requests)"});
    metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", "overloaded"}});
    return;
  }
  if (!s.req.adapter.empty()) {
    s.sink->on_error(ApiError{400, "validation", "adapter '" + s.req.adapter +
                                                     "': LoRA adapters are not served yet; omit adapter_id for the base model"});
    metrics_.inc("quilt_requests_failed_total", 1, {{"error_type", "validation"}});
    return;
  }
  const int r = pick_replica();
  Request sr;
  sr.id = s.id;
  sr.prompt_tokens = static_cast<int32_t>(s.req.prompt_ids.size());
  sr.max_new_tokens = s.req.sampling.max_new_tokens;
  sr.adapter = s.req.adapter;
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
  live.detok = std::make_unique<IncrementalDetokenizer>(tok_, live.req.prompt_ids);
  live.stops = std::make_unique<StopMatcher>(live.req.stop);
  live.arrival = s.arrival;
  metrics_.inc("quilt_requests_total", 1, {{"route", live.req.route.empty() ? "generate" : live.req.route}});
  metrics_.inc("quilt_adapter_requests_total", 1, {{"adapter", live.req.adapter.empty() ? "base" : live.req.adapter}});
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
      seen_[hb->rank] = true;
    }
    return;
  }
  if (auto* r = std::get_if<messages::StepResult>(&m)) {
    on_result(*r);
    return;
  }
  log::warn("coordinator: unexpected ", messages::type_name(m), " from rank ", in.src);
}

void Coordinator::schedule(int r) {
  Replica& rep = replicas_[r];
  if (rep.in_flight) return;
  const StepPlan sp = rep.sched->next_step();
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
    live.context += 1;
    plan.sequences.push_back(std::move(s));
    rep.plan_ids.push_back(id);
  }
  metrics_.observe("quilt_batch_size", static_cast<double>(plan.sequences.size()));
  const Bytes bytes = messages::encode(plan);
  const int first = 1 + r * cfg_.tensor_parallel;
  for (int k = 0; k < cfg_.tensor_parallel; ++k) transport_.send(first + k, bytes);
  rep.in_flight = true;
  rep.sent = now;
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
  if (!res.error.empty()) {
    log::error("replica ", res.replica, " failed step ", res.step_id, ": ", res.error);
    for (uint64_t id : rep.plan_ids) {
      auto it = live_.find(id);
      if (it == live_.end()) continue;
      fail(id, it->second, ApiError{500, "generation", "the model failed this step: " + res.error});
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
    live.sink->on_token(t);
    if (eos) {
      finish(o.request_id, live, FinishReason::eos_token, std::string::npos);
    } else if (stop_at != std::string::npos) {
      finish(o.request_id, live, FinishReason::stop_sequence, stop_at);
    } else if (static_cast<int>(live.tokens.size()) >= live.req.sampling.max_new_tokens) {
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

void Coordinator::tick() {
  const auto now = Clock::now();
  const auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.heartbeat_timeout_s));
  int up = 0;
  for (int rank = 1; rank < static_cast<int>(last_seen_.size()); ++rank)
    if (seen_[rank] && now - last_seen_[rank] <= timeout) ++up;
  metrics_.set("quilt_workers_up", up);
  for (int r = 0; r < static_cast<int>(replicas_.size()); ++r) {
    const auto& s = *replicas_[r].sched;
    const Labels l{{"replica", std::to_string(r)}};
    metrics_.set("quilt_queue_size", static_cast<double>(s.num_waiting()), l);
    metrics_.set("quilt_running_requests", static_cast<double>(s.num_running()), l);
    metrics_.set("quilt_kv_blocks_used", s.used_blocks(), l);
    metrics_.set("quilt_kv_blocks_total", s.used_blocks() + s.free_blocks(), l);
  }
  publish_status();
}

void Coordinator::publish_status() {
  const auto now = Clock::now();
  const auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg_.heartbeat_timeout_s));
  CoordinatorStatus st;
  st.workers_total = static_cast<int>(last_seen_.size()) - 1;
  for (int rank = 1; rank < static_cast<int>(last_seen_.size()); ++rank)
    if (seen_[rank] && now - last_seen_[rank] <= timeout) ++st.workers_up;
  st.healthy = !stopped_ && st.workers_up == st.workers_total;
  st.live_requests = live_.size();
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
