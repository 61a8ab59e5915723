#pragma once
// Checks shared by the backends' sample ops (cpu/sample.cpp, cuda/sample.cu): the logits layout
// and the batch's parameters, as quilt::Error naming the problem.
#include <cmath>
#include <cstdint>

#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

namespace quilt {

struct SampleLayout {
  int64_t shards = 1;       // P
  int64_t rows = 0;         // M
  int64_t shard_vocab = 0;  // Vr
  int64_t vocab = 0;        // V <= P * Vr
};

inline SampleLayout check_sample_batch(const Tensor& logits, const SampleBatch& b) {
  QUILT_REQUIRE(logits.rank() == 2 || logits.rank() == 3, "sample: logits must be [M, Vr] or [P, M, Vr], not ",
                logits.describe());
  SampleLayout L;
  L.shards = logits.rank() == 3 ? logits.dim(0) : 1;
  L.rows = logits.dim(-2);
  L.shard_vocab = logits.dim(-1);
  L.vocab = b.vocab;
  QUILT_REQUIRE(L.vocab > 0 && L.vocab <= L.shards * L.shard_vocab && (L.shards - 1) * L.shard_vocab < L.vocab,
                "sample: vocab ", L.vocab, " does not fit ", L.shards, " shard(s) of ", L.shard_vocab,
                " columns (", logits.describe(), ")");
  QUILT_REQUIRE(L.vocab < (int64_t{1} << 31), "sample: vocab ", L.vocab, " exceeds int32 ids");
  const int64_t npen = static_cast<int64_t>(b.penalties.size());
  for (size_t i = 0; i < b.rows.size(); ++i) {
    const SampleRow& r = b.rows[i];
    QUILT_REQUIRE(r.row >= 0 && r.row < L.rows, "sample: row ", i, " reads logits row ", r.row, " outside [0, ",
                  L.rows, ")");
    QUILT_REQUIRE(r.temperature > 0 && std::isfinite(r.temperature), "sample: row ", i,
                  ": `temperature` must be strictly positive");
    QUILT_REQUIRE(r.top_k >= 0, "sample: row ", i, ": `top_k` must be >= 0");
    QUILT_REQUIRE(r.top_p > 0 && r.top_p <= 1, "sample: row ", i, ": `top_p` must be > 0.0 and <= 1.0");
    QUILT_REQUIRE(r.typical_p > 0 && r.typical_p <= 1, "sample: row ", i, ": `typical_p` must be > 0.0 and <= 1.0");
    QUILT_REQUIRE(r.repetition_penalty > 0 && std::isfinite(r.repetition_penalty), "sample: row ", i,
                  ": `repetition_penalty` must be strictly positive");
    QUILT_REQUIRE(std::isfinite(r.frequency_penalty) && std::isfinite(r.presence_penalty), "sample: row ", i,
                  ": frequency and presence penalties must be finite");
    QUILT_REQUIRE(r.top_n >= 0, "sample: row ", i, ": `top_n` must be >= 0");
    QUILT_REQUIRE(r.penalty_begin >= 0 && r.penalty_count >= 0 &&
                      static_cast<int64_t>(r.penalty_begin) + r.penalty_count <= npen,
                  "sample: row ", i, ": penalties [", r.penalty_begin, ", +", r.penalty_count,
                  ") outside the batch's ", npen);
  }
  for (size_t i = 0; i < b.targets.size(); ++i) {
    const LogprobTarget& t = b.targets[i];
    QUILT_REQUIRE(t.row >= 0 && t.row < L.rows && t.id >= 0 && t.id < L.vocab, "sample: target ", i, " (row ",
                  t.row, ", id ", t.id, ") outside ", L.rows, " rows x ", L.vocab, " tokens");
  }
  return L;
}

}  // namespace quilt
