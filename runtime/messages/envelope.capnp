@0xe064a5d3753b55b4;
# What travels between ranks: exactly one message per buffer, in the flat-array framing
# (capnp::messageToFlatArray). codec.cpp is the only reader and writer.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("quilt::messages::wire");

using Step = import "step.capnp";
using Adapter = import "adapter.capnp";
using Health = import "health.capnp";

struct Envelope {
  # Must equal quilt::messages::kProtocolVersion; ranks built from different sources refuse each
  # other's messages instead of misreading them. Zero never is a valid version, so an all-zero
  # buffer is refused too.
  protocolVersion @0 :UInt16;

  body :union {
    # First, so that a union nobody set reads as `none` and is refused.
    none @1 :Void;
    stepPlan @2 :Step.StepPlan;
    stepResult @3 :Step.StepResult;
    loadAdapter @4 :Adapter.LoadAdapter;
    adapterLoaded @5 :Adapter.AdapterLoaded;
    evictAdapter @6 :Adapter.EvictAdapter;
    heartbeat @7 :Health.Heartbeat;
    shutdown @8 :Health.Shutdown;
  }
}
