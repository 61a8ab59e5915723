#!/bin/bash
# Stage-2 device run (launch/experiments/cuda-stage2.md), on nvidia-h100-x2, from the repository
# root with carry [".devdeps", ".devbuild"]: every CUDA suite on one GPU, TP2 vs TP1 through
# NCCL, decode timings at TP1 and TP2 and the decode all-reduce latency. Logs go to $OUT.
# On a one-GPU machine the TP2 lines fail fast ("--tp 2 needs 2 GPUs") and the rest holds.
source .devdeps/device-env.sh
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH  # dpkg -x skips the alternatives link
export QUILT_GOLDEN_DIR=$PWD/tests/golden/fixtures
MPI="mpirun -np 2 -x LD_LIBRARY_PATH -x QUILT_GOLDEN_DIR -x NCCL_NVLS_ENABLE"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
nvidia-smi topo -m >> $OUT/gpu.txt 2>&1
timeout 200 .devbuild/test_cuda_ops > $OUT/ops.log 2>&1; echo "test_cuda_ops rc=$?" | tee -a $OUT/ops.log
grep -E "FAILED|PASSED|Failure|off; worst" $OUT/ops.log | head -20
timeout 150 .devbuild/test_golden_cuda > $OUT/golden.log 2>&1; echo "test_golden_cuda rc=$?" | tee -a $OUT/golden.log
grep -E "worst|FAILED|PASSED|Failure" $OUT/golden.log | head -10
timeout 200 $MPI .devbuild/test_tensor_parallel_cuda > $OUT/tp.log 2>&1; echo "test_tensor_parallel_cuda np2 rc=$?" | tee -a $OUT/tp.log
grep -E "tp-cuda|FAILED|PASSED|SKIPPED|Failure" $OUT/tp.log | head -20
(
timeout 60 .devbuild/bench_cuda_decode --preset gemma-2b --batch 1 --context 512 --steps 50 --ops
for cfg in "gemma-2b 1 2048" "gemma-2b 8 512" "gemma-2b 32 2048" "gemma-7b 1 2048"; do
  set -- $cfg; timeout 60 .devbuild/bench_cuda_decode --preset $1 --batch $2 --context $3 --steps 30
done
timeout 60 .devbuild/bench_cuda_decode --preset gemma-7b --batch 1 --context 512 --steps 30 --ops
for cfg in "gemma-7b 1 512" "gemma-7b 1 2048" "gemma-2b 1 512" "gemma-7b 8 512"; do
  set -- $cfg; timeout 90 $MPI .devbuild/bench_cuda_decode --preset $1 --batch $2 --context $3 --steps 30 --tp 2
done
NCCL_PROTO=LL timeout 90 $MPI -x NCCL_PROTO .devbuild/bench_cuda_decode --preset gemma-7b --batch 1 --context 512 --steps 30 --tp 2
) > $OUT/bench.log 2>&1
grep -E "\| |\[ops\]|without|error|bench_cuda" $OUT/bench.log
