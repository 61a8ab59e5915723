#!/bin/bash
# Run on the GPU machine (device tool, carry .devdeps and .devbuild with build-gpu/quilt copied in):
#   source .devdeps/device-env.sh; bash launch/experiments/gpu_serve_smoke.sh
# quilt serve with the CUDA backend on one GPU, the tiny default model; then the same requests on the CPU backend.
export LD_LIBRARY_PATH=/opt/dd/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/gpu.txt
for be in cuda cpu; do
  printf 'backend: %s\nreplicas: 1\ntensor_parallel: 1\nhttp: {port: 18080}\nadapters: {slots: 0}\n' $be > /tmp/q.yaml
  mpirun --allow-run-as-root -np 2 .devbuild/quilt serve --config /tmp/q.yaml > $OUT/serve-$be.log 2>&1 &
  for i in $(seq 1 60); do curl -sf localhost:18080/health >/dev/null && break; sleep 0.5; done
  echo "== $be" >> $OUT/results.txt
  curl -s localhost:18080/generate -H 'Content-Type: application/json' -d '{"inputs":"The quick brown fox","parameters":{"max_new_tokens":12,"details":true}}' >> $OUT/results.txt; echo >> $OUT/results.txt
  curl -s localhost:18080/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":"","messages":[{"role":"user","content":"hi"}],"max_tokens":8}' >> $OUT/results.txt; echo >> $OUT/results.txt
  curl -s localhost:18080/metrics | grep -E "^quilt_step_duration_seconds_(sum|count)" >> $OUT/results.txt
  pkill -TERM mpirun; sleep 3
done
cat $OUT/results.txt
