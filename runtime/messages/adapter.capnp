@0x93ef93ef7c2a787f;
# Adapter placement: the coordinator tells every rank of a replica to load a LoRA adapter into a
# slot (each rank reads its own shard) or to evict one. Field meanings live in messages.h.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("quilt::messages::wire");

struct LoadAdapter {
  requestId @0 :UInt64;
  name @1 :Text;
  path @2 :Text;
  slot @3 :Int32;
}

struct AdapterLoaded {
  requestId @0 :UInt64;
  rank @1 :Int32;
  name @2 :Text;
  slot @3 :Int32;
  ok @4 :Bool;
  error @5 :Text;
  loadUs @6 :UInt64;
}

struct EvictAdapter {
  name @0 :Text;
  slot @1 :Int32;
}
