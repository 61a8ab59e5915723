#pragma once
// A small Prometheus registry: counters, gauges and histograms with labels, rendered in the text
// exposition format for GET /metrics. Thread-safe; no globals (the job wires one instance).
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace quilt {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Metrics {
 public:
  // Declares a family once (help text and type); unknown families are an assertion failure.
  void counter(const std::string& name, const std::string& help);
  void gauge(const std::string& name, const std::string& help);
  void histogram(const std::string& name, const std::string& help, std::vector<double> buckets);

  void inc(const std::string& name, double v = 1.0, const Labels& labels = {});
  void set(const std::string& name, double v, const Labels& labels = {});
  void observe(const std::string& name, double v, const Labels& labels = {});
  double value(const std::string& name, const Labels& labels = {}) const;  // counter or gauge
  uint64_t count(const std::string& name, const Labels& labels = {}) const;  // histogram samples

  std::string render() const;

  // The standard serving metrics of Quilt, declared on one registry.
  static void declare_serving_metrics(Metrics& m);

 private:
  enum class Kind { counter, gauge, histogram };
  struct Series {
    double value = 0;
    std::vector<uint64_t> bucket_counts;
    double sum = 0;
    uint64_t count = 0;
  };
  struct Family {
    Kind kind;
    std::string help;
    std::vector<double> buckets;
    std::map<std::string, Series> series;  // rendered label set -> series
  };
  Family& family(const std::string& name);
  const Family* find(const std::string& name) const;
  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

std::string render_labels(const Labels& labels);

}  // namespace quilt
