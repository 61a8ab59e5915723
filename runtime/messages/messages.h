#pragma once
// The control-plane messages between ranks (DESIGN.md: Cap'n Proto over MPI), as plain structs.
// The schemas (*.capnp) and their generated code stay inside runtime/messages/: the rest of the
// job sees only this header. One buffer holds exactly one Message.
//
// Both encode() and decode() check the invariants written next to the fields below and throw
// quilt::Error naming the field when one fails: a sender learns about its bug before the message
// leaves, and a receiver never acts on a corrupt or truncated buffer (Cap'n Proto has no checksum,
// so a corruption that still satisfies every invariant decodes as a valid, different message).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

namespace quilt::messages {

// Bumped whenever a change to the schemas or to the meaning of a field breaks compatibility.
// decode() refuses a message that carries another version.
inline constexpr uint16_t kProtocolVersion = 1;

// adapter_slot of a row that runs the base model alone. Slots 0.. hold LoRA adapters.
inline constexpr int32_t kBaseAdapterSlot = -1;

// ---- StepPlan: coordinator -> every worker of a replica -----------------------------------------

enum class RowKind : uint8_t {
  kPrefill = 0,  // a chunk of the prompt; its tokens travel in the plan
  kDecode = 1,   // one token: the worker's own last sampled token of this request
};

// The per-request sampling settings, LoRAX's meanings. Checked: finite, temperature >= 0,
// top_k >= 0, top_p and typical_p in (0, 1], repetition_penalty > 0, max_new_tokens >= 0,
// top_n_alternatives >= 0.
struct SamplingParams {
  float temperature = 1.0f;
  int32_t top_k = 0;  // 0: off
  float top_p = 1.0f;
  float typical_p = 1.0f;
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  uint64_t seed = 0;  // the request's RNG starts from this, so a request replays exactly
  bool do_sample = false;
  int32_t max_new_tokens = 20;
  int32_t top_n_alternatives = 0;  // return_k_alternatives: how many top tokens to report per step
  bool prompt_logprobs = false;    // decoder_input_details: report the prompt tokens' logprobs

  bool operator==(const SamplingParams&) const = default;
};

// One request's rows in a step.
//  - prefill: input_tokens holds the chunk, num_new_tokens == input_tokens.size() >= 1.
//  - decode: input_tokens is empty, num_new_tokens == 1, start_pos >= 1, needs_sample.
// The new tokens take positions [start_pos, start_pos + num_new_tokens).
struct ScheduledSequence {
  uint64_t request_id = 0;
  RowKind kind = RowKind::kPrefill;
  std::vector<int32_t> input_tokens;  // token ids >= 0
  int32_t start_pos = 0;              // tokens of this request already in the KV cache, >= 0
  int32_t num_new_tokens = 0;
  // KV block ids (>= 0) holding positions [0, start_pos + num_new_tokens), in order. The whole
  // table travels every step so that a worker keeps no block bookkeeping of its own.
  std::vector<int32_t> block_table;
  int32_t adapter_slot = kBaseAdapterSlot;  // >= kBaseAdapterSlot
  // False for a non-final prompt chunk: no token is sampled (prompt logprobs may still be due).
  bool needs_sample = true;
  // Sent with a request's first row and kept by the worker with the sequence; absent on later
  // rows. Required on a prefill row at start_pos 0 (which is always a request's first row). A
  // row that carries it replaces the worker's copy.
  std::optional<SamplingParams> sampling;

  bool operator==(const ScheduledSequence&) const = default;
};

struct StepPlan {
  uint64_t step_id = 0;
  // Finished or cancelled requests: workers drop their state *before* running this step's rows,
  // so a preempted request may be released and re-prefilled from position 0 in the same plan.
  std::vector<uint64_t> release;
  std::vector<ScheduledSequence> sequences;  // request ids are unique within a plan

  bool operator==(const StepPlan&) const = default;
};

// ---- StepResult: tp rank 0 of a replica -> coordinator ------------------------------------------

struct TokenLogprob {
  int32_t id = 0;  // >= 0
  float logprob = 0.0f;

  bool operator==(const TokenLogprob&) const = default;
};

// What one planned row produced, in the plan's order.
struct SequenceOutput {
  uint64_t request_id = 0;
  // The sampled token and its logprob (after the sampling transforms); absent when the row did not
  // sample, and then alternatives is empty and finished_by_eos is false.
  std::optional<TokenLogprob> token;
  std::vector<TokenLogprob> alternatives;  // the top_n_alternatives best tokens, best first
  // With SamplingParams::prompt_logprobs: one entry per input token of this row, the logprob of
  // that token given every earlier one. Position 0 has no context and carries NaN.
  std::vector<float> prompt_logprobs;
  bool finished_by_eos = false;  // the sampled token is an EOS token

  bool operator==(const SequenceOutput&) const = default;  // NaN != NaN: compare logprobs apart
};

struct StepResult {
  uint64_t step_id = 0;
  int32_t replica = 0;  // >= 0
  std::vector<SequenceOutput> sequences;  // request ids are unique within a result
  uint64_t model_us = 0;  // wall time inside the model's forward and sampling
  uint64_t step_us = 0;   // wall time from the plan's arrival to the result's departure
  std::string error;      // empty: the step ran; otherwise why it failed (sequences may be empty)

  bool operator==(const StepResult&) const = default;
};

// ---- Adapters: coordinator -> every rank of a replica, and each rank's answer -------------------

struct LoadAdapter {
  uint64_t request_id = 0;  // echoed by AdapterLoaded
  std::string name;         // non-empty
  std::string path;         // the adapter's folder (PEFT layout), as the worker's host sees it
  int32_t slot = 0;         // >= 0

  bool operator==(const LoadAdapter&) const = default;
};

struct AdapterLoaded {
  uint64_t request_id = 0;  // the LoadAdapter's
  int32_t rank = 0;         // the answering rank (MPI world rank), >= 0
  std::string name;         // non-empty
  int32_t slot = 0;         // >= 0
  bool ok = false;
  std::string error;  // why not ok
  uint64_t load_us = 0;

  bool operator==(const AdapterLoaded&) const = default;
};

struct EvictAdapter {
  std::string name;  // non-empty
  int32_t slot = 0;  // >= 0

  bool operator==(const EvictAdapter&) const = default;
};

// ---- Health and shutdown ------------------------------------------------------------------------

struct Heartbeat {
  int32_t rank = 0;       // MPI world rank of the sender, >= 0
  int32_t replica = -1;   // >= -1; -1: not in a replica (the coordinator)
  uint64_t sequence = 0;  // counts up per sender
  uint64_t sent_at_us = 0;  // sender's system clock, microseconds since the Unix epoch
  bool busy = false;        // a step is running
  int32_t kv_blocks_free = 0;   // 0 <= free <= total
  int32_t kv_blocks_total = 0;

  bool operator==(const Heartbeat&) const = default;
};

struct Shutdown {
  std::string reason;

  bool operator==(const Shutdown&) const = default;
};

// ---- The envelope -------------------------------------------------------------------------------

using Message = std::variant<StepPlan, StepResult, LoadAdapter, AdapterLoaded, EvictAdapter,
                             Heartbeat, Shutdown>;

// "StepPlan", "Heartbeat", ...: for logs.
const char* type_name(const Message& m);

// One message in Cap'n Proto's flat-array framing (as capnp::messageToFlatArray writes it): a
// multiple of 8 bytes. Throws quilt::Error when the message breaks an invariant above. The typed
// overloads spare a copy of a big plan into a Message.
std::vector<uint8_t> encode(const Message& m);
std::vector<uint8_t> encode(const StepPlan& m);
std::vector<uint8_t> encode(const StepResult& m);
std::vector<uint8_t> encode(const LoadAdapter& m);
std::vector<uint8_t> encode(const AdapterLoaded& m);
std::vector<uint8_t> encode(const EvictAdapter& m);
std::vector<uint8_t> encode(const Heartbeat& m);
std::vector<uint8_t> encode(const Shutdown& m);

// Parses and checks one encoded message, copying it into plain structs (nothing of the buffer is
// kept). `data` needs no particular alignment. Throws quilt::Error naming the problem when the
// buffer is not a whole message (size not a multiple of 8, truncated, trailing bytes), is
// malformed, comes from another protocol version, or breaks an invariant; never crashes on any
// input.
Message decode(const uint8_t* data, size_t size);
inline Message decode(std::span<const uint8_t> bytes) { return decode(bytes.data(), bytes.size()); }

}  // namespace quilt::messages
