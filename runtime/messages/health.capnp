@0xbd12bd598f63bfd6;
# Liveness and the end of the job. Field meanings live in messages.h.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("quilt::messages::wire");

struct Heartbeat {
  rank @0 :Int32;
  replica @1 :Int32;
  sequence @2 :UInt64;
  sentAtUs @3 :UInt64;
  busy @4 :Bool;
  kvBlocksFree @5 :Int32;
  kvBlocksTotal @6 :Int32;
}

struct Shutdown {
  reason @0 :Text;
}
