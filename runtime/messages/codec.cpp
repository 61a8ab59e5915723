// The only translation unit that sees Cap'n Proto: plain structs <-> envelope.capnp.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "envelope.capnp.h"
#include "runtime/core/check.h"
#include "runtime/messages/messages.h"

namespace quilt::messages {
namespace {

namespace w = wire;

// ---- invariants (messages.h documents them; encode and decode both run these) -------------------

template <typename T>
void require_unique_request_ids(const std::vector<T>& rows, const char* where) {
  std::vector<uint64_t> ids;
  ids.reserve(rows.size());
  for (const auto& r : rows) ids.push_back(r.request_id);
  std::sort(ids.begin(), ids.end());
  auto dup = std::adjacent_find(ids.begin(), ids.end());
  QUILT_REQUIRE(dup == ids.end(), where, ": request ", *dup, " appears twice");
}

void check(const SamplingParams& s, const std::string& where) {
  auto finite = [&](float v, const char* name) {
    QUILT_REQUIRE(std::isfinite(v), where, ".", name, " is not finite (", v, ")");
  };
  finite(s.temperature, "temperature");
  finite(s.top_p, "top_p");
  finite(s.typical_p, "typical_p");
  finite(s.repetition_penalty, "repetition_penalty");
  finite(s.frequency_penalty, "frequency_penalty");
  finite(s.presence_penalty, "presence_penalty");
  QUILT_REQUIRE(s.temperature >= 0, where, ".temperature must be >= 0, got ", s.temperature);
  QUILT_REQUIRE(s.top_k >= 0, where, ".top_k must be >= 0, got ", s.top_k);
  QUILT_REQUIRE(s.top_p > 0 && s.top_p <= 1, where, ".top_p must be in (0, 1], got ", s.top_p);
  QUILT_REQUIRE(s.typical_p > 0 && s.typical_p <= 1, where, ".typical_p must be in (0, 1], got ",
                s.typical_p);
  QUILT_REQUIRE(s.repetition_penalty > 0, where, ".repetition_penalty must be > 0, got ",
                s.repetition_penalty);
  QUILT_REQUIRE(s.max_new_tokens >= 0, where, ".max_new_tokens must be >= 0, got ",
                s.max_new_tokens);
  QUILT_REQUIRE(s.top_n_alternatives >= 0, where, ".top_n_alternatives must be >= 0, got ",
                s.top_n_alternatives);
}

void check(const ScheduledSequence& q, const std::string& where) {
  QUILT_REQUIRE(q.start_pos >= 0, where, ": start_pos must be >= 0, got ", q.start_pos);
  QUILT_REQUIRE(int64_t{q.start_pos} + q.num_new_tokens <= INT32_MAX, where,
                ": start_pos + num_new_tokens overflows int32");
  QUILT_REQUIRE(q.adapter_slot >= kBaseAdapterSlot, where, ": adapter_slot must be >= ",
                kBaseAdapterSlot, ", got ", q.adapter_slot);
  if (q.kind == RowKind::kPrefill) {
    QUILT_REQUIRE(q.num_new_tokens >= 1, where, ": a prefill row needs num_new_tokens >= 1, got ",
                  q.num_new_tokens);
    QUILT_REQUIRE(q.input_tokens.size() == static_cast<size_t>(q.num_new_tokens), where,
                  ": a prefill row carries ", q.input_tokens.size(), " input tokens but ",
                  "num_new_tokens is ", q.num_new_tokens);
    QUILT_REQUIRE(q.start_pos > 0 || q.sampling.has_value(), where,
                  ": a prefill row at start_pos 0 is the request's first and must carry sampling");
  } else if (q.kind == RowKind::kDecode) {
    QUILT_REQUIRE(q.input_tokens.empty(), where, ": a decode row carries ", q.input_tokens.size(),
                  " input tokens; the worker supplies its last sampled token");
    QUILT_REQUIRE(q.num_new_tokens == 1, where, ": a decode row needs num_new_tokens == 1, got ",
                  q.num_new_tokens);
    QUILT_REQUIRE(q.start_pos >= 1, where, ": a decode row needs start_pos >= 1, got ",
                  q.start_pos);
    QUILT_REQUIRE(q.needs_sample, where, ": a decode row must sample");
  } else {
    QUILT_FAIL(where, ": unknown row kind ", static_cast<unsigned>(q.kind));
  }
  for (size_t i = 0; i < q.input_tokens.size(); ++i)
    QUILT_REQUIRE(q.input_tokens[i] >= 0, where, ".input_tokens[", i, "] is negative (",
                  q.input_tokens[i], ")");
  for (size_t i = 0; i < q.block_table.size(); ++i)
    QUILT_REQUIRE(q.block_table[i] >= 0, where, ".block_table[", i, "] is negative (",
                  q.block_table[i], ")");
  if (q.sampling) check(*q.sampling, where + ".sampling");
}

std::string row_where(const char* list, size_t i, uint64_t request_id) {
  return detail::concat(list, "[", i, "] (request ", request_id, ")");
}

void check(const StepPlan& m) {
  for (size_t i = 0; i < m.sequences.size(); ++i)
    check(m.sequences[i], row_where("StepPlan.sequences", i, m.sequences[i].request_id));
  require_unique_request_ids(m.sequences, "StepPlan.sequences");
}

void check(const SequenceOutput& o, const std::string& where) {
  if (o.token) {
    QUILT_REQUIRE(o.token->id >= 0, where, ": sampled token id is negative (", o.token->id, ")");
  } else {
    QUILT_REQUIRE(o.alternatives.empty(), where, ": alternatives without a sampled token");
    QUILT_REQUIRE(!o.finished_by_eos, where, ": finished_by_eos without a sampled token");
  }
  for (size_t i = 0; i < o.alternatives.size(); ++i)
    QUILT_REQUIRE(o.alternatives[i].id >= 0, where, ".alternatives[", i, "] has a negative id (",
                  o.alternatives[i].id, ")");
}

void check(const StepResult& m) {
  QUILT_REQUIRE(m.replica >= 0, "StepResult.replica must be >= 0, got ", m.replica);
  for (size_t i = 0; i < m.sequences.size(); ++i)
    check(m.sequences[i], row_where("StepResult.sequences", i, m.sequences[i].request_id));
  require_unique_request_ids(m.sequences, "StepResult.sequences");
}

void check(const LoadAdapter& m) {
  QUILT_REQUIRE(!m.name.empty(), "LoadAdapter.name is empty");
  QUILT_REQUIRE(m.slot >= 0, "LoadAdapter.slot must be >= 0, got ", m.slot);
}

void check(const AdapterLoaded& m) {
  QUILT_REQUIRE(!m.name.empty(), "AdapterLoaded.name is empty");
  QUILT_REQUIRE(m.slot >= 0, "AdapterLoaded.slot must be >= 0, got ", m.slot);
  QUILT_REQUIRE(m.rank >= 0, "AdapterLoaded.rank must be >= 0, got ", m.rank);
}

void check(const EvictAdapter& m) {
  QUILT_REQUIRE(!m.name.empty(), "EvictAdapter.name is empty");
  QUILT_REQUIRE(m.slot >= 0, "EvictAdapter.slot must be >= 0, got ", m.slot);
}

void check(const Heartbeat& m) {
  QUILT_REQUIRE(m.rank >= 0, "Heartbeat.rank must be >= 0, got ", m.rank);
  QUILT_REQUIRE(m.replica >= -1, "Heartbeat.replica must be >= -1, got ", m.replica);
  QUILT_REQUIRE(m.kv_blocks_free >= 0 && m.kv_blocks_free <= m.kv_blocks_total,
                "Heartbeat: need 0 <= kv_blocks_free <= kv_blocks_total, got ", m.kv_blocks_free,
                " of ", m.kv_blocks_total);
}

void check(const Shutdown&) {}

// ---- size estimate: one first segment that fits the whole message -------------------------------

// Words of a primitive list's content.
size_t list_words(size_t n, size_t elem_bytes) { return (n * elem_bytes + 7) / 8; }
size_t text_words(const std::string& s) { return list_words(s.size() + 1, 1); }

size_t estimate_words(const StepPlan& m) {
  size_t n = 16 + list_words(m.release.size(), 8);
  for (const auto& q : m.sequences)
    n += 8 + 8 + list_words(q.input_tokens.size(), 4) + list_words(q.block_table.size(), 4);
  return n;
}
size_t estimate_words(const StepResult& m) {
  size_t n = 16 + text_words(m.error);
  for (const auto& o : m.sequences)
    n += 6 + o.alternatives.size() + list_words(o.prompt_logprobs.size(), 4);
  return n;
}
size_t estimate_words(const LoadAdapter& m) { return 16 + text_words(m.name) + text_words(m.path); }
size_t estimate_words(const AdapterLoaded& m) {
  return 16 + text_words(m.name) + text_words(m.error);
}
size_t estimate_words(const EvictAdapter& m) { return 16 + text_words(m.name); }
size_t estimate_words(const Heartbeat&) { return 16; }
size_t estimate_words(const Shutdown& m) { return 16 + text_words(m.reason); }

// ---- plain -> wire ------------------------------------------------------------------------------

kj::StringPtr text(const std::string& s) { return kj::StringPtr(s.c_str(), s.size()); }

template <typename T, typename V>
void fill_list(typename capnp::List<T>::Builder out, const std::vector<V>& in) {
  for (size_t i = 0; i < in.size(); ++i) out.set(static_cast<unsigned>(i), in[i]);
}

void fill(w::SamplingParams::Builder b, const SamplingParams& s) {
  b.setTemperature(s.temperature);
  b.setTopK(s.top_k);
  b.setTopP(s.top_p);
  b.setTypicalP(s.typical_p);
  b.setRepetitionPenalty(s.repetition_penalty);
  b.setFrequencyPenalty(s.frequency_penalty);
  b.setPresencePenalty(s.presence_penalty);
  b.setSeed(s.seed);
  b.setDoSample(s.do_sample);
  b.setMaxNewTokens(s.max_new_tokens);
  b.setTopNAlternatives(s.top_n_alternatives);
  b.setPromptLogprobs(s.prompt_logprobs);
}

void fill(w::StepPlan::Builder b, const StepPlan& m) {
  b.setStepId(m.step_id);
  fill_list<uint64_t>(b.initRelease(static_cast<unsigned>(m.release.size())), m.release);
  auto rows = b.initSequences(static_cast<unsigned>(m.sequences.size()));
  for (size_t i = 0; i < m.sequences.size(); ++i) {
    const ScheduledSequence& q = m.sequences[i];
    auto r = rows[static_cast<unsigned>(i)];
    r.setRequestId(q.request_id);
    r.setKind(q.kind == RowKind::kPrefill ? w::RowKind::PREFILL : w::RowKind::DECODE);
    fill_list<int32_t>(r.initInputTokens(static_cast<unsigned>(q.input_tokens.size())),
                       q.input_tokens);
    r.setStartPos(q.start_pos);
    r.setNumNewTokens(q.num_new_tokens);
    fill_list<int32_t>(r.initBlockTable(static_cast<unsigned>(q.block_table.size())),
                       q.block_table);
    r.setAdapterSlot(q.adapter_slot);
    r.setNeedsSample(q.needs_sample);
    if (q.sampling) fill(r.initSampling(), *q.sampling);
  }
}

void fill(w::StepResult::Builder b, const StepResult& m) {
  b.setStepId(m.step_id);
  b.setReplica(m.replica);
  auto rows = b.initSequences(static_cast<unsigned>(m.sequences.size()));
  for (size_t i = 0; i < m.sequences.size(); ++i) {
    const SequenceOutput& o = m.sequences[i];
    auto r = rows[static_cast<unsigned>(i)];
    r.setRequestId(o.request_id);
    r.setSampled(o.token.has_value());
    if (o.token) {
      r.setTokenId(o.token->id);
      r.setLogprob(o.token->logprob);
    }
    auto alts = r.initAlternatives(static_cast<unsigned>(o.alternatives.size()));
    for (size_t k = 0; k < o.alternatives.size(); ++k) {
      alts[static_cast<unsigned>(k)].setId(o.alternatives[k].id);
      alts[static_cast<unsigned>(k)].setLogprob(o.alternatives[k].logprob);
    }
    fill_list<float>(r.initPromptLogprobs(static_cast<unsigned>(o.prompt_logprobs.size())),
                     o.prompt_logprobs);
    r.setFinishedByEos(o.finished_by_eos);
  }
  b.setModelUs(m.model_us);
  b.setStepUs(m.step_us);
  b.setError(text(m.error));
}

void fill(w::LoadAdapter::Builder b, const LoadAdapter& m) {
  b.setRequestId(m.request_id);
  b.setName(text(m.name));
  b.setPath(text(m.path));
  b.setSlot(m.slot);
}

void fill(w::AdapterLoaded::Builder b, const AdapterLoaded& m) {
  b.setRequestId(m.request_id);
  b.setRank(m.rank);
  b.setName(text(m.name));
  b.setSlot(m.slot);
  b.setOk(m.ok);
  b.setError(text(m.error));
  b.setLoadUs(m.load_us);
}

void fill(w::EvictAdapter::Builder b, const EvictAdapter& m) {
  b.setName(text(m.name));
  b.setSlot(m.slot);
}

void fill(w::Heartbeat::Builder b, const Heartbeat& m) {
  b.setRank(m.rank);
  b.setReplica(m.replica);
  b.setSequence(m.sequence);
  b.setSentAtUs(m.sent_at_us);
  b.setBusy(m.busy);
  b.setKvBlocksFree(m.kv_blocks_free);
  b.setKvBlocksTotal(m.kv_blocks_total);
}

void fill(w::Shutdown::Builder b, const Shutdown& m) { b.setReason(text(m.reason)); }

void init_and_fill(w::Envelope::Body::Builder b, const StepPlan& m) { fill(b.initStepPlan(), m); }
void init_and_fill(w::Envelope::Body::Builder b, const StepResult& m) {
  fill(b.initStepResult(), m);
}
void init_and_fill(w::Envelope::Body::Builder b, const LoadAdapter& m) {
  fill(b.initLoadAdapter(), m);
}
void init_and_fill(w::Envelope::Body::Builder b, const AdapterLoaded& m) {
  fill(b.initAdapterLoaded(), m);
}
void init_and_fill(w::Envelope::Body::Builder b, const EvictAdapter& m) {
  fill(b.initEvictAdapter(), m);
}
void init_and_fill(w::Envelope::Body::Builder b, const Heartbeat& m) { fill(b.initHeartbeat(), m); }
void init_and_fill(w::Envelope::Body::Builder b, const Shutdown& m) { fill(b.initShutdown(), m); }

template <typename T>
const char* name_of();
template <> const char* name_of<StepPlan>() { return "StepPlan"; }
template <> const char* name_of<StepResult>() { return "StepResult"; }
template <> const char* name_of<LoadAdapter>() { return "LoadAdapter"; }
template <> const char* name_of<AdapterLoaded>() { return "AdapterLoaded"; }
template <> const char* name_of<EvictAdapter>() { return "EvictAdapter"; }
template <> const char* name_of<Heartbeat>() { return "Heartbeat"; }
template <> const char* name_of<Shutdown>() { return "Shutdown"; }

constexpr size_t kMaxSegmentWords = (size_t{1} << 29) - 1;  // Cap'n Proto's segment size field
static_assert(std::endian::native == std::endian::little, "the segment table is written raw");

// Builds the message straight into the output vector: the first segment is the vector's tail
// after the 8-byte segment table, so a message that fits it (the size estimate sees to that) is
// framed by writing that table and trimming, with no copy.
class VectorMessageBuilder final : public capnp::MessageBuilder {
 public:
  explicit VectorMessageBuilder(size_t first_segment_words)
      : bytes_((1 + first_segment_words) * sizeof(capnp::word)) {
    QUILT_ASSERT(reinterpret_cast<uintptr_t>(bytes_.data()) % alignof(capnp::word) == 0);
  }

  kj::ArrayPtr<capnp::word> allocateSegment(unsigned minimum_words) override {
    if (!first_taken_ && minimum_words <= first_words()) {
      first_taken_ = true;
      return kj::arrayPtr(first_segment(), first_words());
    }
    first_taken_ = true;
    // Later segments double, as MallocMessageBuilder's do.
    size_t words = std::max<size_t>(minimum_words, 2 * std::max<size_t>(last_words_, 1024));
    words = std::min(words, kMaxSegmentWords);
    last_words_ = words;
    more_.push_back(kj::heapArray<capnp::word>(words));
    std::memset(more_.back().begin(), 0, words * sizeof(capnp::word));
    return more_.back();
  }

  // The flat-array framing of what was built; leaves the builder unusable.
  std::vector<uint8_t> take_flat_array() {
    auto segments = getSegmentsForOutput();
    if (segments.size() == 1 && segments[0].begin() == first_segment()) {
      const auto words = static_cast<uint32_t>(segments[0].size());
      const uint32_t header[2] = {0, words};  // segment count - 1, then each segment's size
      std::memcpy(bytes_.data(), header, sizeof header);
      bytes_.resize((1 + size_t{words}) * sizeof(capnp::word));
      return std::move(bytes_);
    }
    std::vector<uint8_t> out(capnp::computeSerializedSizeInWords(segments) *
                             sizeof(capnp::word));
    kj::ArrayOutputStream stream(kj::arrayPtr(reinterpret_cast<kj::byte*>(out.data()), out.size()));
    capnp::writeMessage(stream, segments);
    QUILT_ASSERT(stream.getArray().size() == out.size());
    return out;
  }

 private:
  // operator new aligns the vector's buffer for any scalar, so its second word is word-aligned.
  capnp::word* first_segment() { return reinterpret_cast<capnp::word*>(bytes_.data()) + 1; }
  size_t first_words() const { return bytes_.size() / sizeof(capnp::word) - 1; }

  std::vector<uint8_t> bytes_;  // zeroed, as Cap'n Proto requires of a fresh segment
  bool first_taken_ = false;
  size_t last_words_ = 0;
  std::vector<kj::Array<capnp::word>> more_;
};

template <typename T>
std::vector<uint8_t> encode_one(const T& m) {
  try {
    check(m);
  } catch (const Error& e) {
    QUILT_FAIL("cannot encode ", name_of<T>(), ": ", e.what());
  }
  try {
    VectorMessageBuilder builder(std::min(estimate_words(m), kMaxSegmentWords));
    auto root = builder.initRoot<w::Envelope>();
    root.setProtocolVersion(kProtocolVersion);
    init_and_fill(root.initBody(), m);
    return builder.take_flat_array();
  } catch (const kj::Exception& e) {
    QUILT_FAIL("cannot encode ", name_of<T>(), ": ", e.getDescription().cStr());
  }
}

// ---- wire -> plain ------------------------------------------------------------------------------

template <typename T, typename R>
std::vector<T> read_list(R list) {
  std::vector<T> out;
  out.reserve(list.size());
  for (auto v : list) out.push_back(v);
  return out;
}

std::string read_text(capnp::Text::Reader t) { return std::string(t.cStr(), t.size()); }

SamplingParams read(w::SamplingParams::Reader r) {
  SamplingParams s;
  s.temperature = r.getTemperature();
  s.top_k = r.getTopK();
  s.top_p = r.getTopP();
  s.typical_p = r.getTypicalP();
  s.repetition_penalty = r.getRepetitionPenalty();
  s.frequency_penalty = r.getFrequencyPenalty();
  s.presence_penalty = r.getPresencePenalty();
  s.seed = r.getSeed();
  s.do_sample = r.getDoSample();
  s.max_new_tokens = r.getMaxNewTokens();
  s.top_n_alternatives = r.getTopNAlternatives();
  s.prompt_logprobs = r.getPromptLogprobs();
  return s;
}

StepPlan read(w::StepPlan::Reader r) {
  StepPlan m;
  m.step_id = r.getStepId();
  m.release = read_list<uint64_t>(r.getRelease());
  auto rows = r.getSequences();
  m.sequences.reserve(rows.size());
  for (auto row : rows) {
    ScheduledSequence q;
    q.request_id = row.getRequestId();
    switch (row.getKind()) {
      case w::RowKind::PREFILL: q.kind = RowKind::kPrefill; break;
      case w::RowKind::DECODE: q.kind = RowKind::kDecode; break;
      default:
        QUILT_FAIL("StepPlan.sequences[", m.sequences.size(), "] (request ", q.request_id,
                   "): unknown row kind ", static_cast<unsigned>(row.getKind()));
    }
    q.input_tokens = read_list<int32_t>(row.getInputTokens());
    q.start_pos = row.getStartPos();
    q.num_new_tokens = row.getNumNewTokens();
    q.block_table = read_list<int32_t>(row.getBlockTable());
    q.adapter_slot = row.getAdapterSlot();
    q.needs_sample = row.getNeedsSample();
    if (row.hasSampling()) q.sampling = read(row.getSampling());
    m.sequences.push_back(std::move(q));
  }
  return m;
}

StepResult read(w::StepResult::Reader r) {
  StepResult m;
  m.step_id = r.getStepId();
  m.replica = r.getReplica();
  auto rows = r.getSequences();
  m.sequences.reserve(rows.size());
  for (auto row : rows) {
    SequenceOutput o;
    o.request_id = row.getRequestId();
    if (row.getSampled()) o.token = TokenLogprob{row.getTokenId(), row.getLogprob()};
    auto alts = row.getAlternatives();
    o.alternatives.reserve(alts.size());
    for (auto a : alts) o.alternatives.push_back(TokenLogprob{a.getId(), a.getLogprob()});
    o.prompt_logprobs = read_list<float>(row.getPromptLogprobs());
    o.finished_by_eos = row.getFinishedByEos();
    m.sequences.push_back(std::move(o));
  }
  m.model_us = r.getModelUs();
  m.step_us = r.getStepUs();
  m.error = read_text(r.getError());
  return m;
}

LoadAdapter read(w::LoadAdapter::Reader r) {
  return LoadAdapter{r.getRequestId(), read_text(r.getName()), read_text(r.getPath()),
                     r.getSlot()};
}

AdapterLoaded read(w::AdapterLoaded::Reader r) {
  AdapterLoaded m;
  m.request_id = r.getRequestId();
  m.rank = r.getRank();
  m.name = read_text(r.getName());
  m.slot = r.getSlot();
  m.ok = r.getOk();
  m.error = read_text(r.getError());
  m.load_us = r.getLoadUs();
  return m;
}

EvictAdapter read(w::EvictAdapter::Reader r) {
  return EvictAdapter{read_text(r.getName()), r.getSlot()};
}

Heartbeat read(w::Heartbeat::Reader r) {
  Heartbeat m;
  m.rank = r.getRank();
  m.replica = r.getReplica();
  m.sequence = r.getSequence();
  m.sent_at_us = r.getSentAtUs();
  m.busy = r.getBusy();
  m.kv_blocks_free = r.getKvBlocksFree();
  m.kv_blocks_total = r.getKvBlocksTotal();
  return m;
}

Shutdown read(w::Shutdown::Reader r) { return Shutdown{read_text(r.getReason())}; }

Message read(w::Envelope::Reader root) {
  QUILT_REQUIRE(root.getProtocolVersion() == kProtocolVersion, "message has protocol version ",
                root.getProtocolVersion(), " but this build speaks ", kProtocolVersion,
                " (do all ranks run the same build?)");
  auto body = root.getBody();
  switch (body.which()) {
    case w::Envelope::Body::NONE: QUILT_FAIL("message carries no body");
    case w::Envelope::Body::STEP_PLAN: return read(body.getStepPlan());
    case w::Envelope::Body::STEP_RESULT: return read(body.getStepResult());
    case w::Envelope::Body::LOAD_ADAPTER: return read(body.getLoadAdapter());
    case w::Envelope::Body::ADAPTER_LOADED: return read(body.getAdapterLoaded());
    case w::Envelope::Body::EVICT_ADAPTER: return read(body.getEvictAdapter());
    case w::Envelope::Body::HEARTBEAT: return read(body.getHeartbeat());
    case w::Envelope::Body::SHUTDOWN: return read(body.getShutdown());
  }
  QUILT_FAIL("unknown message type ", static_cast<unsigned>(body.which()),
             " (sent by a newer build?)");
}

}  // namespace

const char* type_name(const Message& m) {
  return std::visit([](const auto& v) { return name_of<std::decay_t<decltype(v)>>(); }, m);
}

std::vector<uint8_t> encode(const Message& m) {
  return std::visit([](const auto& v) { return encode_one(v); }, m);
}
std::vector<uint8_t> encode(const StepPlan& m) { return encode_one(m); }
std::vector<uint8_t> encode(const StepResult& m) { return encode_one(m); }
std::vector<uint8_t> encode(const LoadAdapter& m) { return encode_one(m); }
std::vector<uint8_t> encode(const AdapterLoaded& m) { return encode_one(m); }
std::vector<uint8_t> encode(const EvictAdapter& m) { return encode_one(m); }
std::vector<uint8_t> encode(const Heartbeat& m) { return encode_one(m); }
std::vector<uint8_t> encode(const Shutdown& m) { return encode_one(m); }

Message decode(const uint8_t* data, size_t size) {
  constexpr size_t kWord = sizeof(capnp::word);
  QUILT_REQUIRE(size > 0, "cannot decode an empty buffer");
  QUILT_REQUIRE(data != nullptr, "cannot decode a null buffer of ", size, " bytes");
  QUILT_REQUIRE(size % kWord == 0, "cannot decode a buffer of ", size,
                " bytes: a message is a whole number of 8-byte words (truncated or not a message?)");
  const size_t words = size / kWord;

  // Cap'n Proto reads words in place; copy a buffer that is not word-aligned.
  std::vector<capnp::word> aligned;
  const capnp::word* begin = reinterpret_cast<const capnp::word*>(data);
  if (reinterpret_cast<uintptr_t>(data) % alignof(capnp::word) != 0) {
    aligned.resize(words);
    std::memcpy(aligned.data(), data, size);
    begin = aligned.data();
  }

  capnp::ReaderOptions options;
  // Every word is read once while copying out, so a valid message traverses about its own size;
  // the slack covers headers. More than that means pointers aliasing one another (an
  // amplification attack or corruption).
  options.traversalLimitInWords = 2 * words + 1024;
  // Envelope > StepPlan > sequences > row > sampling: 5 deep.
  options.nestingLimit = 16;

  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(begin, words), options);
    const size_t used = static_cast<size_t>(reader.getEnd() - begin);
    QUILT_REQUIRE(used == words, "cannot decode: ", (words - used) * kWord,
                  " trailing bytes after a message of ", used * kWord, " bytes");
    Message m = read(reader.getRoot<w::Envelope>());
    try {
      std::visit([](const auto& v) { check(v); }, m);
    } catch (const Error& e) {
      QUILT_FAIL("decoded ", type_name(m), " is invalid: ", e.what());
    }
    return m;
  } catch (const kj::Exception& e) {
    QUILT_FAIL("cannot decode a malformed message (", size, " bytes): ",
               e.getDescription().cStr());
  }
}

}  // namespace quilt::messages
