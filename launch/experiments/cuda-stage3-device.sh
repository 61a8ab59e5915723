#!/bin/bash
# Issue 5, stage 3 device run (nvidia-h100-x4; carry .devdeps and .devbuild/r4): CUDA suites, TP2 model test,
# one-shot all-reduce tests and bench at 2 and 4 ranks, bench-step tables, quilt serve at TP2. Logs to $OUT.
source .devdeps/device-env.sh
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
export QUILT_GOLDEN_DIR=$PWD/tests/golden/fixtures
R=.devbuild/r4  # binaries copied (stripped) from build-gpu: see cuda-stage3.md
MPI="mpirun --allow-run-as-root -x LD_LIBRARY_PATH -x QUILT_GOLDEN_DIR -x NCCL_NVLS_ENABLE"
nvidia-smi --query-gpu=index,name --format=csv,noheader
for x in test_cuda_sample test_cuda_lora test_cuda_ops test_cuda_prefill test_golden_cuda; do
  timeout 150 $R/$x > $OUT/$x.log 2>&1; echo "$x rc=$? $(grep -E '^\[  (PASSED|FAILED)' $OUT/$x.log | tr '\n' ' ')"
done
grep -E "differ from the CPU|seeded draws|us per call|µs|graphs vs eager" $OUT/test_cuda_sample.log $OUT/test_golden_cuda.log | cut -c1-220 | head -30
grep -E "Failure|FAILED|off; worst" $OUT/test_cuda_sample.log | head -10
timeout 150 $MPI -np 2 $R/test_tensor_parallel_cuda > $OUT/tp2.log 2>&1; echo "tp_cuda np2 rc=$? $(grep -cE '^\[  PASSED' $OUT/tp2.log)"
for np in 2 4; do
  timeout 150 $MPI -np $np $R/test_allreduce_cuda > $OUT/ar_test_np$np.log 2>&1; echo "allreduce test np$np rc=$?"; grep -E "ranks on|BAD|PASSED|FAILED" $OUT/ar_test_np$np.log | head -5
  timeout 90 $MPI -np $np $R/bench_allreduce > $OUT/ar_bench_np$np.log 2>&1; echo "allreduce bench np$np rc=$?"; grep -E "^\||\[bench\]" $OUT/ar_bench_np$np.log | sed -E 's/NVIDIA H100 80GB HBM3/H100/' | head -24
done
bs() { grep -vE "pmix|dlopen|Perhaps|^\s*$" $1 | cut -c1-190; }
timeout 200 $R/quilt bench-step --preset gemma-2b --batch 1,8,32,128,256 --context 512,2048 --only decode,lora --steps 15 --json $OUT/bench.jsonl > $OUT/b2.log 2>&1; echo "2b rc=$?"; bs $OUT/b2.log
timeout 120 $R/quilt bench-step --preset gemma-7b --batch 1,8,32 --context 512,2048 --only decode,lora --lora-adapters 8 --steps 15 --json $OUT/bench.jsonl > $OUT/b7.log 2>&1; echo "7b rc=$?"; bs $OUT/b7.log
for np in 2 4; do
  timeout 100 $MPI -np $np $R/quilt bench-step --preset gemma-7b --batch 1,8 --context 512 --only decode,allreduce --steps 15 --json $OUT/bench.jsonl > $OUT/b7tp$np.log 2>&1; echo "7b tp$np rc=$?"; bs $OUT/b7tp$np.log
done
timeout 100 bash launch/experiments/gpu_serve_tp2_smoke.sh
