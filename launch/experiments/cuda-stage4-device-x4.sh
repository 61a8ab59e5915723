#!/bin/bash
source .devdeps/device-env.sh
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
export QUILT_GOLDEN_DIR=$PWD/tests/golden/fixtures
R=.devbuild/f2
MPI="mpirun --allow-run-as-root -x LD_LIBRARY_PATH -x QUILT_GOLDEN_DIR -x NCCL_NVLS_ENABLE"
for np in 2 4; do
  timeout 120 $MPI -np $np $R/test_tensor_parallel_cuda > $OUT/tp$np.log 2>&1; echo "tp_cuda np$np rc=$?"; grep -E "tp-cuda|PASSED|FAILED" $OUT/tp$np.log | head -8
  timeout 100 $MPI -np $np $R/quilt bench-step --preset gemma-7b --batch 1,8 --context 512 --graphs on --only decode,allreduce --steps 20 > $OUT/b7tp$np.log 2>&1; echo "7b tp$np rc=$?"; grep -E "^(decode|all-reduce)" $OUT/b7tp$np.log | cut -c1-150
done
R=.devbuild/f2 EXTRA_YAML="cuda: {kv_cache_dtype: fp8_e4m3}" timeout 100 bash launch/experiments/gpu_serve_tp2_smoke.sh 2>&1 | tail -14 | cut -c1-300
