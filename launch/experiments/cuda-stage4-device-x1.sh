#!/bin/bash
source .devdeps/device-env.sh
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
export QUILT_GOLDEN_DIR=$PWD/tests/golden/fixtures
R=.devbuild/f
passed() { grep -E '^.*\[  (PASSED|FAILED)' "$1" | tr '\n' ' '; }
for x in test_cuda_kv_fp8 test_golden_cuda test_cuda_ops; do
  timeout 200 $R/$x > $OUT/$x.log 2>&1; echo "$x rc=$? $(passed $OUT/$x.log)"
done
grep -E "all fixtures|graphs vs eager" $OUT/test_cuda_kv_fp8.log $OUT/test_golden_cuda.log | cut -c1-230 | head -20
bs() { grep -E "^(decode|prefill|lora)" $1 | cut -c1-170; }
timeout 120 $R/quilt bench-step --preset gemma-2b --batch 1,8,32,128,256 --context 512 --graphs on --only decode,lora --lora-adapters 1,8,32 --steps 20 --json $OUT/bench.jsonl > $OUT/b2.log 2>&1; echo "2b rc=$?"; bs $OUT/b2.log
for kv in auto fp8_e4m3; do
timeout 100 $R/quilt bench-step --preset gemma-2b --kv-dtype $kv --batch 32,128 --context 2048 --graphs on --only decode --steps 15 --json $OUT/bench.jsonl > $OUT/b2kv$kv.log 2>&1; echo "2b kv $kv rc=$?"; bs $OUT/b2kv$kv.log
timeout 100 $R/quilt bench-step --preset gemma-7b --kv-dtype $kv --batch 1,32 --context 2048 --graphs on --only decode --steps 15 --json $OUT/bench.jsonl > $OUT/b7kv$kv.log 2>&1; echo "7b kv $kv rc=$?"; bs $OUT/b7kv$kv.log
done
timeout 100 $R/quilt bench-step --preset gemma-7b --batch 1 --context 512 --graphs on --only decode,prefill,lora --prefill 1024,4096 --lora-adapters 8 --steps 20 --json $OUT/bench.jsonl > $OUT/b7.log 2>&1; echo "7b rc=$?"; bs $OUT/b7.log
