@0xa17d27d323d75cfc;
# One scheduling step: the coordinator's plan (sent to every worker of a replica) and the answer
# of the replica's tp rank 0. Field meanings are documented once, on the plain C++ structs in
# messages.h; keep the defaults here equal to the defaults there.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("quilt::messages::wire");

enum RowKind {
  prefill @0;  # a chunk of the prompt; its tokens travel in the plan
  decode @1;   # one token: the worker's own last sampled token for this request
}

struct SamplingParams {
  temperature @0 :Float32 = 1.0;
  topK @1 :Int32 = 0;
  topP @2 :Float32 = 1.0;
  typicalP @3 :Float32 = 1.0;
  repetitionPenalty @4 :Float32 = 1.0;
  frequencyPenalty @5 :Float32 = 0.0;
  presencePenalty @6 :Float32 = 0.0;
  seed @7 :UInt64 = 0;
  doSample @8 :Bool = false;
  maxNewTokens @9 :Int32 = 20;
  topNAlternatives @10 :Int32 = 0;
  promptLogprobs @11 :Bool = false;
}

struct ScheduledSequence {
  requestId @0 :UInt64;
  kind @1 :RowKind;
  inputTokens @2 :List(Int32);
  startPos @3 :Int32;
  numNewTokens @4 :Int32;
  blockTable @5 :List(Int32);
  adapterSlot @6 :Int32 = -1;
  needsSample @7 :Bool = true;
  sampling @8 :SamplingParams;  # null: the worker keeps using the params it already has
}

struct StepPlan {
  stepId @0 :UInt64;
  release @1 :List(UInt64);
  sequences @2 :List(ScheduledSequence);
}

struct TokenLogprob {
  id @0 :Int32;
  logprob @1 :Float32;
}

struct SequenceOutput {
  requestId @0 :UInt64;
  # The sampled token, inline rather than behind a pointer: most rows have one.
  sampled @1 :Bool;
  tokenId @2 :Int32;
  logprob @3 :Float32;
  alternatives @4 :List(TokenLogprob);
  promptLogprobs @5 :List(Float32);
  finishedByEos @6 :Bool;
}

struct StepResult {
  stepId @0 :UInt64;
  replica @1 :Int32;
  sequences @2 :List(SequenceOutput);
  modelUs @3 :UInt64;
  stepUs @4 :UInt64;
  error @5 :Text;
}
