#!/bin/bash
# quilt serve on the GPUs: TP2 (np 3) with the tiny default model and its demo adapters.
R=${R:-.devbuild/r4}  # folder holding the quilt binary
printf 'backend: cuda\nreplicas: 1\ntensor_parallel: 2\nhttp: {port: 18080}\nadapters: {slots: 4}\n%s\n' "${EXTRA_YAML:-}" > /tmp/q.yaml
mpirun --allow-run-as-root -np 3 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE $R/quilt serve --config /tmp/q.yaml > $OUT/serve.log 2>&1 &
for i in $(seq 1 120); do curl -sf localhost:18080/health >/dev/null && break; sleep 0.5; done
g() { curl -s -m 20 localhost:18080/generate -H 'Content-Type: application/json' -d "$1"; echo; }
{
echo "== greedy"; g '{"inputs":"The quick brown fox","parameters":{"max_new_tokens":12,"details":true}}'
echo "== adapter demo-all-r8"; g '{"inputs":"The quick brown fox","parameters":{"max_new_tokens":12,"adapter_id":"demo-all-r8"}}'
echo "== sampled seed 7 (twice)"; for k in 1 2; do g '{"inputs":"Hello","parameters":{"max_new_tokens":12,"do_sample":true,"top_p":0.9,"top_k":50,"temperature":0.8,"seed":7,"repetition_penalty":1.2}}'; done
echo "== chat"; curl -s -m 20 localhost:18080/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":"","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"logprobs":true,"top_logprobs":2}'; echo
echo "== bad adapter"; g '{"inputs":"x","parameters":{"adapter_id":"nope"}}'
curl -s localhost:18080/metrics | grep -E "^quilt_(step_duration_seconds_(sum|count)|kv_blocks_total)"
} > $OUT/serve_results.txt 2>&1
pkill -TERM mpirun; sleep 3
cat $OUT/serve_results.txt | cut -c1-400
grep -E "KV|graph|error|warn" $OUT/serve.log | grep -v pmix | head -12
