#!/bin/bash
# Decode GEMV and small-kernel work (issue 5): device checks and before/after tables on one H100.
# Binaries are built on the CPU machine and copied (stripped) into .devbuild/gemv/{tests,bench}:
# "before" is the tree at f3da2fd, "after" is f3da2fd plus this change only (new GEMV kernels,
# PDL, the small kernels, the benchmark's cold-L2 and graph columns). Carry .devdeps and
# .devbuild/gemv (58 MB together); each mode fits one 10-minute call:
#   bash launch/experiments/gemv-device.sh tests   # ~3 min
#   bash launch/experiments/gemv-device.sh bench   # ~5 min
# Full logs go to $OUT; stdout gets a summary.
source .devdeps/device-env.sh
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
export QUILT_GOLDEN_DIR=$PWD/tests/golden/fixtures
G=.devbuild/gemv
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
passed() { grep -E '^\[  (PASSED|FAILED)' "$1" | tr '\n' ' '; }

case "${1:-}" in
tests)
  # Every op against the CPU (every GEMV kernel forced, M 1..8), and the decode chain back to back
  # and from a graph against synchronised ops (bitwise); then the chain without PDL; then golden.
  timeout 300 $G/tests/test_cuda_ops > $OUT/test_cuda_ops.log 2>&1
  echo "test_cuda_ops rc=$? $(passed $OUT/test_cuda_ops.log)"
  grep -E "Failure|elements off|differ from|Expected|Which is" $OUT/test_cuda_ops.log | head -20
  echo "largest matmul errors (scaled, per dtype):"
  for d in f32 bf16 f16; do
    grep -E "^\[cuda-ops\] $d +matmul" $OUT/test_cuda_ops.log | awk -F'= ' '{print $2 " |" $1}' | sort -g | tail -2 | cut -c1-150
  done
  grep -E "decode chain" $OUT/test_cuda_ops.log | cut -c1-130 | head -24
  QUILT_CUDA_PDL=0 timeout 200 $G/tests/test_cuda_ops --gtest_filter='*DecodeChain*:*Matmul*:*Rope*:*RmsNorm*' \
    > $OUT/test_cuda_ops_nopdl.log 2>&1
  echo "test_cuda_ops (QUILT_CUDA_PDL=0, chain/matmul/rope/norm) rc=$? $(passed $OUT/test_cuda_ops_nopdl.log)"
  timeout 200 $G/tests/test_golden_cuda > $OUT/test_golden_cuda.log 2>&1
  echo "test_golden_cuda rc=$? $(passed $OUT/test_golden_cuda.log)"
  grep -E "graphs vs eager|Failure|FAILED" $OUT/test_golden_cuda.log | cut -c1-200 | head -10
  ;;
bench)
  # Per-op tables (bench_cuda_decode --ops) before and after, 2b and 7b, batch 1 and 8; then the
  # figure of merit, quilt bench-step decode (graphs), before, after, and after without PDL.
  for p in gemma-2b gemma-7b; do
    for b in 1 8; do
      for v in before after; do
        log=$OUT/ops_${p}_b${b}_$v.log
        timeout 150 $G/bench/${v}_bench_cuda_decode --preset $p --batch $b --context 512 --ops > $log 2>&1
        echo "== $p B=$b $v rc=$?: $(grep -E 'measured .* ms/step' $log | sed -E 's/.*measured ([0-9.]+) ms.*/\1 ms\/step/') "
        # picked kernels only (no "(alt)" rows); after: warm | graph | cold (TB/s, % of 3.35)
        grep -E '^\[ops\]   ' $log | grep -v '(alt)' | sed -E 's/ +/ /g' | cut -c1-150
        grep -E '^\[ops\] sum' $log | cut -c1-150
      done
      grep -E 'matmul: M=' $OUT/ops_${p}_b${b}_after.log | sed -E 's/.*matmul: //' | cut -c1-170
    done
  done
  for v in before after after_nopdl; do
    bin=$G/bench/${v%_nopdl}_quilt
    env $([ $v = after_nopdl ] && echo QUILT_CUDA_PDL=0) timeout 150 $bin bench-step --preset gemma-2b --batch 1,8 \
      --context 512 --only decode --steps 30 --json $OUT/bench_step.jsonl > $OUT/step_$v.log 2>&1
    echo "== bench-step gemma-2b $v rc=$?"
    grep -E "decode" $OUT/step_$v.log | grep -vE "pmix|dlopen" | cut -c1-170
  done
  ;;
*)
  echo "usage: $0 tests|bench" >&2
  exit 2
  ;;
esac
