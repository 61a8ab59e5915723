#include "runtime/coordinator/metrics.h"

#include <cmath>
#include <sstream>

#include "runtime/core/check.h"

namespace quilt {

std::string render_labels(const Labels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i) out += ",";
    out += labels[i].first + "=\"";
    for (char c : labels[i].second) {
      if (c == '\\' || c == '"') out += '\\';
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out += c;
    }
    out += "\"";
  }
  return out + "}";
}

void Metrics::counter(const std::string& name, const std::string& help) {
  std::lock_guard<std::mutex> lk(mu_);
  families_[name] = Family{Kind::counter, help, {}, {}};
}
void Metrics::gauge(const std::string& name, const std::string& help) {
  std::lock_guard<std::mutex> lk(mu_);
  families_[name] = Family{Kind::gauge, help, {}, {}};
}
void Metrics::histogram(const std::string& name, const std::string& help, std::vector<double> buckets) {
  std::lock_guard<std::mutex> lk(mu_);
  families_[name] = Family{Kind::histogram, help, std::move(buckets), {}};
}

Metrics::Family& Metrics::family(const std::string& name) {
  auto it = families_.find(name);
  QUILT_ASSERT(it != families_.end(), "undeclared metric ", name);
  return it->second;
}
const Metrics::Family* Metrics::find(const std::string& name) const {
  auto it = families_.find(name);
  return it == families_.end() ? nullptr : &it->second;
}

void Metrics::inc(const std::string& name, double v, const Labels& labels) {
  std::lock_guard<std::mutex> lk(mu_);
  family(name).series[render_labels(labels)].value += v;
}
void Metrics::set(const std::string& name, double v, const Labels& labels) {
  std::lock_guard<std::mutex> lk(mu_);
  family(name).series[render_labels(labels)].value = v;
}
void Metrics::observe(const std::string& name, double v, const Labels& labels) {
  std::lock_guard<std::mutex> lk(mu_);
  Family& f = family(name);
  QUILT_ASSERT(f.kind == Kind::histogram, name, " is not a histogram");
  Series& s = f.series[render_labels(labels)];
  if (s.bucket_counts.empty()) s.bucket_counts.assign(f.buckets.size(), 0);
  for (size_t i = 0; i < f.buckets.size(); ++i)
    if (v <= f.buckets[i]) ++s.bucket_counts[i];
  s.sum += v;
  ++s.count;
}
double Metrics::value(const std::string& name, const Labels& labels) const {
  std::lock_guard<std::mutex> lk(mu_);
  const Family* f = find(name);
  if (!f) return 0;
  auto it = f->series.find(render_labels(labels));
  return it == f->series.end() ? 0 : it->second.value;
}
uint64_t Metrics::count(const std::string& name, const Labels& labels) const {
  std::lock_guard<std::mutex> lk(mu_);
  const Family* f = find(name);
  if (!f) return 0;
  auto it = f->series.find(render_labels(labels));
  return it == f->series.end() ? 0 : it->second.count;
}

namespace {
std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}
// Adds le="..." to a rendered label set.
std::string with_le(const std::string& labels, const std::string& le) {
  if (labels.empty()) return "{le=\"" + le + "\"}";
  return labels.substr(0, labels.size() - 1) + ",le=\"" + le + "\"}";
}
}  // namespace

std::string Metrics::render() const {
  std::lock_guard<std::mutex> lk(mu_);
  std::ostringstream os;
  for (const auto& [name, f] : families_) {
    const char* type = f.kind == Kind::counter ? "counter" : f.kind == Kind::gauge ? "gauge" : "histogram";
    os << "# HELP " << name << " " << f.help << "\n# TYPE " << name << " " << type << "\n";
    if (f.kind != Kind::histogram) {
      if (f.series.empty()) os << name << " 0\n";
      for (const auto& [labels, s] : f.series) os << name << labels << " " << num(s.value) << "\n";
      continue;
    }
    for (const auto& [labels, s] : f.series) {
      for (size_t i = 0; i < f.buckets.size(); ++i)
        os << name << "_bucket" << with_le(labels, num(f.buckets[i])) << " " << s.bucket_counts[i] << "\n";
      os << name << "_bucket" << with_le(labels, "+Inf") << " " << s.count << "\n";
      os << name << "_sum" << labels << " " << num(s.sum) << "\n";
      os << name << "_count" << labels << " " << s.count << "\n";
    }
  }
  return os.str();
}

void Metrics::declare_serving_metrics(Metrics& m) {
  const std::vector<double> seconds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  const std::vector<double> sizes = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  m.counter("quilt_requests_total", "Requests accepted, by route");
  m.counter("quilt_requests_failed_total", "Requests that ended in an error, by error type");
  m.counter("quilt_requests_finished_total", "Requests finished, by finish reason");
  m.counter("quilt_generated_tokens_total", "Tokens generated");
  m.counter("quilt_prompt_tokens_total", "Prompt tokens prefilled");
  m.counter("quilt_adapter_requests_total", "Requests per adapter (base = the base model)");
  m.counter("quilt_adapter_generated_tokens_total", "Tokens generated per adapter");
  m.counter("quilt_adapter_cold_requests_total", "Requests that arrived for an adapter not resident on their replica");
  m.counter("quilt_adapter_load_failures_total", "Adapter loads that failed, per adapter");
  m.counter("quilt_adapter_loads_total", "Adapter loads started, per replica");
  m.counter("quilt_adapter_evictions_total", "Adapters evicted from a slot to make room, per replica");
  m.histogram("quilt_adapter_load_duration_seconds", "Time to make an adapter resident on a replica (all its ranks)", seconds);
  m.gauge("quilt_adapters_resident", "Adapters resident, per replica");
  m.gauge("quilt_adapter_resident", "1 when the adapter is resident on the replica, 0 once evicted");
  m.histogram("quilt_request_queue_duration_seconds", "Time from arrival to the first scheduled step", seconds);
  m.histogram("quilt_request_ttft_seconds", "Time to first token", seconds);
  m.histogram("quilt_request_time_per_output_token_seconds", "Mean time per output token after the first", seconds);
  m.histogram("quilt_request_duration_seconds", "End-to-end request time", seconds);
  m.histogram("quilt_step_duration_seconds", "Time of one batch step on a replica, plan to result", seconds);
  m.histogram("quilt_batch_size", "Sequences in a step", sizes);
  m.histogram("quilt_step_overhead_seconds",
              "Per back-to-back step, the time from one plan to the next not spent in the worker's step "
              "(transport, codec, scheduling, detokenization), by rows in the step",
              {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05});
  m.gauge("quilt_queue_size", "Requests waiting, per replica");
  m.gauge("quilt_running_requests", "Requests running, per replica");
  m.gauge("quilt_kv_blocks_used", "KV cache blocks in use, per replica");
  m.gauge("quilt_kv_blocks_total", "KV cache blocks, per replica");
  m.gauge("quilt_workers_up", "Worker ranks that answered their last heartbeat in time");
}

}  // namespace quilt
