// The control-plane codec: every message round-trips, and no buffer, however truncated or
// corrupt, makes decode() do anything but return a valid message or throw quilt::Error.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>

#include "runtime/core/check.h"
#include "runtime/messages/messages.h"

namespace quilt::messages {
namespace {

constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();

SamplingParams sampling_params(uint64_t seed) {
  SamplingParams s;
  s.temperature = 0.7f;
  s.top_k = 40;
  s.top_p = 0.95f;
  s.typical_p = 0.5f;
  s.repetition_penalty = 1.3f;
  s.frequency_penalty = -0.25f;
  s.presence_penalty = 1.5f;
  s.seed = seed;
  s.do_sample = true;
  s.max_new_tokens = 512;
  s.top_n_alternatives = 5;
  s.prompt_logprobs = true;
  return s;
}

StepPlan sample_plan() {
  StepPlan p;
  p.step_id = kMaxU64 - 1;
  p.release = {kMaxU64, 0, 42};
  ScheduledSequence first;  // a request's first chunk, not its last: no sample yet
  first.request_id = kMaxU64;
  first.kind = RowKind::kPrefill;
  first.input_tokens = {2, 651, 6037, 255999, 0};
  first.start_pos = 0;
  first.num_new_tokens = 5;
  first.block_table = {7};
  first.adapter_slot = 3;
  first.needs_sample = false;
  first.sampling = sampling_params(kMaxU64);
  ScheduledSequence last;  // the final chunk of a longer prompt, on the base model
  last.request_id = 1;
  last.kind = RowKind::kPrefill;
  last.input_tokens = {9, 8, 7};
  last.start_pos = 16;
  last.num_new_tokens = 3;
  last.block_table = {0, 2147483647};
  last.adapter_slot = kBaseAdapterSlot;
  last.needs_sample = true;
  ScheduledSequence decode;  // no tokens: the worker has the last sampled one
  decode.request_id = 0;
  decode.kind = RowKind::kDecode;
  decode.start_pos = 2147483646;
  decode.num_new_tokens = 1;
  decode.block_table = {1, 4, 5};
  decode.adapter_slot = 0;
  decode.sampling = SamplingParams{};  // resent: replaces the worker's copy
  p.sequences = {first, last, decode};
  return p;
}

StepResult sample_result() {
  StepResult r;
  r.step_id = kMaxU64;
  r.replica = 3;
  SequenceOutput a;
  a.request_id = kMaxU64;
  a.token = TokenLogprob{255999, -0.125f};
  a.alternatives = {{255999, -0.125f}, {1, -2.5f}, {0, -std::numeric_limits<float>::infinity()}};
  a.finished_by_eos = true;
  SequenceOutput b;  // a non-final chunk: prompt logprobs only
  b.request_id = 7;
  b.prompt_logprobs = {-1.0f, -0.0f, -123.456f, std::numeric_limits<float>::lowest()};
  SequenceOutput c;  // nothing at all
  c.request_id = 8;
  r.sequences = {a, b, c};
  r.model_us = 123456789;
  r.step_us = kMaxU64;
  r.error = "";
  return r;
}

std::vector<Message> samples() {
  std::vector<Message> out;
  out.push_back(sample_plan());
  out.push_back(StepPlan{});
  out.push_back(sample_result());
  StepResult failed;
  failed.step_id = 9;
  failed.error = "CUDA error: out of memory — 内存不足 🔥";
  out.push_back(failed);
  out.push_back(LoadAdapter{kMaxU64, "ünïcødé/adapter-名前", "/models/adapters/ünï 名前", 0});
  out.push_back(AdapterLoaded{17, 4, "a", 31, false, "adapter_config.json: r = 0 ✗", kMaxU64});
  out.push_back(AdapterLoaded{17, 0, "base-ish", 0, true, "", 0});
  out.push_back(EvictAdapter{"π", 2147483647});
  out.push_back(Heartbeat{5, -1, kMaxU64, 1700000000123456ull, true, 0, 0});
  out.push_back(Heartbeat{2147483647, 1, 0, 0, false, 1000, 4096});
  out.push_back(Shutdown{});
  out.push_back(Shutdown{std::string("interior\0nul and 🛑 stop", 26)});
  return out;
}

Message round_trip(const Message& m) {
  std::vector<uint8_t> bytes = encode(m);
  EXPECT_EQ(bytes.size() % 8, 0u);
  return decode(bytes.data(), bytes.size());
}

TEST(Messages, EveryTypeRoundTrips) {
  for (const Message& m : samples()) {
    SCOPED_TRACE(type_name(m));
    Message back = round_trip(m);
    EXPECT_EQ(back.index(), m.index());
    EXPECT_TRUE(back == m);
  }
}

TEST(Messages, StepPlanFieldsSurvive) {
  StepPlan p = sample_plan();
  StepPlan back = std::get<StepPlan>(round_trip(p));
  ASSERT_EQ(back.sequences.size(), 3u);
  EXPECT_EQ(back.step_id, kMaxU64 - 1);
  EXPECT_EQ(back.release, (std::vector<uint64_t>{kMaxU64, 0, 42}));
  EXPECT_EQ(back.sequences[0].request_id, kMaxU64);
  EXPECT_FALSE(back.sequences[0].needs_sample);
  ASSERT_TRUE(back.sequences[0].sampling.has_value());
  EXPECT_EQ(back.sequences[0].sampling->seed, kMaxU64);
  EXPECT_FLOAT_EQ(back.sequences[0].sampling->frequency_penalty, -0.25f);
  EXPECT_FALSE(back.sequences[1].sampling.has_value());  // absent stays absent
  EXPECT_EQ(back.sequences[1].adapter_slot, kBaseAdapterSlot);
  EXPECT_EQ(back.sequences[2].kind, RowKind::kDecode);
  EXPECT_TRUE(back.sequences[2].input_tokens.empty());
  EXPECT_EQ(back.sequences[2].start_pos, 2147483646);
  ASSERT_TRUE(back.sequences[2].sampling.has_value());
  EXPECT_EQ(*back.sequences[2].sampling, SamplingParams{});
}

TEST(Messages, StepResultKeepsNanAndAbsentToken) {
  StepResult r = sample_result();
  r.sequences[1].prompt_logprobs[0] = std::numeric_limits<float>::quiet_NaN();  // position 0
  StepResult back = std::get<StepResult>(round_trip(r));
  ASSERT_EQ(back.sequences.size(), 3u);
  EXPECT_TRUE(std::isnan(back.sequences[1].prompt_logprobs[0]));
  EXPECT_EQ(std::signbit(back.sequences[1].prompt_logprobs[1]), true);  // -0.0 bit-exact
  EXPECT_FALSE(back.sequences[1].token.has_value());
  EXPECT_EQ(back.sequences[0].token->id, 255999);
  EXPECT_TRUE(std::isinf(back.sequences[0].alternatives[2].logprob));
  EXPECT_TRUE(back.sequences[0].finished_by_eos);
  EXPECT_EQ(back.step_us, kMaxU64);
}

TEST(Messages, TypedOverloadsEncodeTheSameBytes) {
  StepPlan p = sample_plan();
  EXPECT_EQ(encode(p), encode(Message{p}));
  Heartbeat h{1, 0, 2, 3, true, 4, 5};
  EXPECT_EQ(encode(h), encode(Message{h}));
  EXPECT_STREQ(type_name(Message{h}), "Heartbeat");
  EXPECT_STREQ(type_name(Message{p}), "StepPlan");
}

TEST(Messages, UnalignedBufferDecodes) {
  std::vector<uint8_t> bytes = encode(sample_plan());
  std::vector<uint8_t> shifted(bytes.size() + 3);
  std::memcpy(shifted.data() + 3, bytes.data(), bytes.size());
  EXPECT_TRUE(decode(shifted.data() + 3, bytes.size()) == Message{sample_plan()});
}

// Best of 5 wall times of encode and of decode, in milliseconds.
std::pair<double, double> best_times(const StepPlan& p) {
  using clock = std::chrono::steady_clock;
  auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
  double enc = 1e30, dec = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto t0 = clock::now();
    std::vector<uint8_t> bytes = encode(p);
    auto t1 = clock::now();
    Message back = decode(bytes.data(), bytes.size());
    auto t2 = clock::now();
    enc = std::min(enc, ms(t1 - t0));
    dec = std::min(dec, ms(t2 - t1));
  }
  return {enc, dec};
}

// Prompts of 256 x 4096 tokens with their block tables (block size 16): the payload is 4 bytes a
// token and 4 a block, and the encoding should add little to it.
TEST(Messages, BigStepPlan) {
  constexpr int kSeqs = 256, kTokens = 4096, kBlock = 16;
  StepPlan p;
  p.step_id = 1;
  std::mt19937 rng(7);
  for (int s = 0; s < kSeqs; ++s) {
    ScheduledSequence q;
    q.request_id = kMaxU64 - s;
    q.kind = RowKind::kPrefill;
    q.input_tokens.resize(kTokens);
    for (auto& t : q.input_tokens) t = static_cast<int32_t>(rng() % 256000);
    q.num_new_tokens = kTokens;
    for (int b = 0; b < kTokens / kBlock; ++b) q.block_table.push_back(s * (kTokens / kBlock) + b);
    q.adapter_slot = s % 8 - 1;
    q.sampling = sampling_params(s);
    p.sequences.push_back(std::move(q));
  }
  std::vector<uint8_t> bytes = encode(p);
  EXPECT_TRUE(std::get<StepPlan>(decode(bytes.data(), bytes.size())) == p);

  const double payload = 4.0 * kSeqs * kTokens + 4.0 * kSeqs * (kTokens / kBlock);
  const double ratio = bytes.size() / payload;
  auto [enc_ms, dec_ms] = best_times(p);
  std::printf("[ size     ] StepPlan %d x %d tokens: %zu bytes (%.3f MiB), %.4f x the 4-byte "
              "token + block payload; encode %.2f ms, decode %.2f ms (best of 5)\n",
              kSeqs, kTokens, bytes.size(), bytes.size() / 1048576.0, ratio, enc_ms, dec_ms);
  EXPECT_LT(ratio, 1.01);

  // A decode step of the same batch: no tokens, just the tables.
  StepPlan d;
  d.step_id = 2;
  for (auto& q : p.sequences) {
    ScheduledSequence r;
    r.request_id = q.request_id;
    r.kind = RowKind::kDecode;
    r.start_pos = kTokens;
    r.num_new_tokens = 1;
    r.block_table = q.block_table;
    r.block_table.push_back(static_cast<int32_t>(100000 + r.block_table.size()));
    d.sequences.push_back(std::move(r));
  }
  std::vector<uint8_t> dbytes = encode(d);
  std::tie(enc_ms, dec_ms) = best_times(d);
  std::printf("[ size     ] decode StepPlan %d rows (257 blocks each): %zu bytes (%.1f per row); "
              "encode %.3f ms, decode %.3f ms (best of 5)\n",
              kSeqs, dbytes.size(), dbytes.size() / double(kSeqs), enc_ms, dec_ms);
  EXPECT_LT(dbytes.size(), size_t{kSeqs} * (257 * 4 + 64));

  StepResult res;
  for (int s = 0; s < kSeqs; ++s) {
    SequenceOutput o;
    o.request_id = s;
    o.token = TokenLogprob{s, -1.0f};
    res.sequences.push_back(o);
  }
  std::vector<uint8_t> rbytes = encode(res);
  std::printf("[ size     ] StepResult %d rows, no alternatives: %zu bytes (%.1f per row)\n", kSeqs,
              rbytes.size(), rbytes.size() / double(kSeqs));
  std::printf("[ size     ] Heartbeat %zu bytes, Shutdown{} %zu bytes\n",
              encode(Heartbeat{}).size(), encode(Shutdown{}).size());
}

// decode() either throws quilt::Error or returns a message that is valid: re-encoding it works.
// Anything else (a crash, another exception type) fails the test or the process.
bool decodes(const std::vector<uint8_t>& bytes) {
  try {
    Message m = decode(bytes.data(), bytes.size());
    std::vector<uint8_t> again = encode(m);
    EXPECT_TRUE(decode(again.data(), again.size()).index() == m.index());
    return true;
  } catch (const Error& e) {
    EXPECT_GT(std::strlen(e.what()), 10u);
    return false;
  }
}

TEST(Messages, EveryTruncationIsRefused) {
  size_t cases = 0;
  for (const Message& m : samples()) {
    SCOPED_TRACE(type_name(m));
    std::vector<uint8_t> bytes = encode(m);
    for (size_t n = 0; n < bytes.size(); ++n) {
      std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + n);
      EXPECT_THROW(decode(cut.data(), cut.size()), Error) << "prefix of " << n << " bytes";
      ++cases;
    }
  }
  std::printf("[ cases    ] %zu truncations\n", cases);
}

TEST(Messages, RandomCorruptionNeverCrashes) {
  std::mt19937_64 rng(20240601);
  int refused = 0, accepted = 0;
  std::vector<Message> msgs = samples();
  for (int trial = 0; trial < 600; ++trial) {
    std::vector<uint8_t> bytes = encode(msgs[trial % msgs.size()]);
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      size_t at = rng() % bytes.size();
      if (rng() % 2) bytes[at] ^= static_cast<uint8_t>(1u << (rng() % 8));  // one bit
      else bytes[at] = static_cast<uint8_t>(rng());                          // one byte
    }
    (decodes(bytes) ? accepted : refused)++;
  }
  // Whole words of garbage, including the segment table and pointers.
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<uint8_t> bytes(8 * (1 + rng() % 16));
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    if (trial % 3 == 0) bytes[0] = bytes[1] = bytes[2] = bytes[3] = 0;  // claim one segment
    (decodes(bytes) ? accepted : refused)++;
  }
  std::printf("[ cases    ] corruption: %d refused, %d decoded to a valid message\n", refused,
              accepted);
  EXPECT_GT(refused, 0);
}

TEST(Messages, SizeNotMultipleOfEightIsRefused) {
  std::vector<uint8_t> bytes = encode(Heartbeat{});
  bytes.push_back(0);
  try {
    decode(bytes.data(), bytes.size());
    FAIL() << "decoded a buffer of " << bytes.size() << " bytes";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("8-byte words"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(bytes.size()) + " bytes"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(decode(nullptr, 0), Error);
}

std::string decode_error(const std::vector<uint8_t>& bytes) {
  try {
    decode(bytes.data(), bytes.size());
  } catch (const Error& e) {
    return e.what();
  }
  return "(decoded)";
}

TEST(Messages, TrailingBytesAreRefused) {
  std::vector<uint8_t> bytes = encode(Shutdown{"bye"});
  bytes.resize(bytes.size() + 8, 0);
  EXPECT_NE(decode_error(bytes).find("8 trailing bytes"), std::string::npos) << decode_error(bytes);
}

// The envelope's layout (single segment): 8 bytes of segment table, the root pointer, then the
// root struct's data word: protocolVersion in bytes 16-17, the union tag in bytes 18-19.
TEST(Messages, EnvelopeHeaderIsChecked) {
  const std::vector<uint8_t> good = encode(Shutdown{"bye"});
  std::vector<uint8_t> bytes = good;
  bytes[16] = 7;
  bytes[17] = 0;
  EXPECT_NE(decode_error(bytes).find("protocol version 7"), std::string::npos)
      << decode_error(bytes);
  bytes = good;
  bytes[18] = bytes[19] = 0;
  EXPECT_NE(decode_error(bytes).find("no body"), std::string::npos) << decode_error(bytes);
  bytes = good;
  bytes[18] = 99;
  EXPECT_NE(decode_error(bytes).find("unknown message type 99"), std::string::npos)
      << decode_error(bytes);
  std::vector<uint8_t> zeros(64, 0);
  EXPECT_THROW(decode(zeros.data(), zeros.size()), Error);
}

// The row kind sits in the 16 bits after the row's request id (see step.capnp's layout).
TEST(Messages, UnknownRowKindIsRefused) {
  StepPlan p;
  ScheduledSequence q;
  q.request_id = 0x1122334455667788ull;
  q.kind = RowKind::kDecode;
  q.start_pos = 3;
  q.num_new_tokens = 1;
  p.sequences.push_back(q);
  std::vector<uint8_t> bytes = encode(p);
  const uint8_t pattern[8] = {0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11};  // little-endian
  auto it = std::search(bytes.begin(), bytes.end(), pattern, pattern + 8);
  ASSERT_NE(it, bytes.end());
  const size_t kind_at = static_cast<size_t>(it - bytes.begin()) + 8;
  ASSERT_EQ(bytes[kind_at], 1);
  bytes[kind_at] = 5;
  EXPECT_NE(decode_error(bytes).find("unknown row kind 5"), std::string::npos)
      << decode_error(bytes);
  bytes[kind_at] = 0;  // now a prefill row without tokens
  EXPECT_NE(decode_error(bytes).find("a prefill row carries 0 input tokens"), std::string::npos)
      << decode_error(bytes);
}

std::string encode_error(const Message& m) {
  try {
    encode(m);
  } catch (const Error& e) {
    return e.what();
  }
  return "(encoded)";
}

TEST(Messages, InvariantsAreCheckedAtEncode) {
  auto plan_with = [](auto edit) {
    StepPlan p = sample_plan();
    edit(p);
    return encode_error(p);
  };
  auto has = [](const std::string& what, const std::string& part) {
    return what.find(part) != std::string::npos;
  };
  std::string e;
  e = plan_with([](StepPlan& p) { p.sequences[2].input_tokens = {1}; });
  EXPECT_TRUE(has(e, "sequences[2] (request 0): a decode row carries 1 input tokens")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[1].num_new_tokens = 4; });
  EXPECT_TRUE(has(e, "carries 3 input tokens but num_new_tokens is 4")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].sampling.reset(); });
  EXPECT_TRUE(has(e, "must carry sampling")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[1].request_id = 0; });
  EXPECT_TRUE(has(e, "request 0 appears twice")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].adapter_slot = -2; });
  EXPECT_TRUE(has(e, "adapter_slot must be >= -1")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[1].block_table[0] = -1; });
  EXPECT_TRUE(has(e, "block_table[0] is negative")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].input_tokens[2] = -5; });
  EXPECT_TRUE(has(e, "input_tokens[2] is negative")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[2].needs_sample = false; });
  EXPECT_TRUE(has(e, "a decode row must sample")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].sampling->temperature = NAN; });
  EXPECT_TRUE(has(e, "sampling.temperature is not finite")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].sampling->top_p = 0; });
  EXPECT_TRUE(has(e, "top_p must be in (0, 1]")) << e;
  e = plan_with([](StepPlan& p) { p.sequences[0].kind = static_cast<RowKind>(9); });
  EXPECT_TRUE(has(e, "unknown row kind 9")) << e;
  EXPECT_TRUE(has(e, "cannot encode StepPlan")) << e;

  StepResult r = sample_result();
  r.sequences[2].finished_by_eos = true;
  EXPECT_TRUE(has(encode_error(r), "finished_by_eos without a sampled token")) << encode_error(r);
  EXPECT_TRUE(has(encode_error(LoadAdapter{1, "", "/x", 0}), "LoadAdapter.name is empty"));
  EXPECT_TRUE(has(encode_error(EvictAdapter{"a", -1}), "EvictAdapter.slot must be >= 0"));
  EXPECT_TRUE(has(encode_error(Heartbeat{0, 0, 0, 0, false, 5, 4}), "kv_blocks_free"));
}

}  // namespace
}  // namespace quilt::messages
