#!/usr/bin/env python3
"""Coordinator overhead per decode step on CPU, by the number of running requests.

Starts `mpirun -np 2 quilt serve` on the tiny default model, runs N concurrent greedy requests
(64 tokens each, EOS ignored) for N in 1, 4, 16, 64, 128 and reads from /metrics:
  quilt_step_overhead_seconds{rows=...}: per back-to-back step, the time from one plan to the
      next not spent inside the worker's step (transport both ways, codec, scheduling,
      detokenization, stop checks, streaming events);
  quilt_step_duration_seconds: plan sent -> result back, for comparison.
Usage: python3 launch/experiments/coordinator_overhead.py [path/to/quilt]
"""
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import json

QUILT = sys.argv[1] if len(sys.argv) > 1 else "build/quilt"


def metrics(url):
    return urllib.request.urlopen(url + "/metrics").read().decode()


def hist(text, name, labels=""):
    s = c = 0.0
    for line in text.splitlines():
        m = re.match(rf'{name}_(sum|count)(\{{[^}}]*\}})? (\S+)', line)
        if m and (not labels or labels in (m.group(2) or "")):
            if m.group(1) == "sum":
                s += float(m.group(3))
            else:
                c += float(m.group(3))
    return s, c


def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    job = subprocess.Popen(["mpirun", "--oversubscribe", "-np", "2", QUILT, "serve", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except Exception:
                time.sleep(0.1)
        print(f"{'running':>8} {'steps':>6} {'overhead/step':>14} {'step (plan->result)':>20} {'share':>6}")
        for n in (1, 4, 16, 64, 128):
            before = metrics(url)
            body = json.dumps({"inputs": "The quick brown fox jumps over the lazy dog",
                               "parameters": {"max_new_tokens": 64, "ignore_eos_token": True}}).encode()

            def one(_):
                req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
                return urllib.request.urlopen(req, timeout=300).status
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
                assert all(s == 200 for s in pool.map(one, range(n)))
            after = metrics(url)
            s0, c0 = hist(before, "quilt_step_overhead_seconds")
            s1, c1 = hist(after, "quilt_step_overhead_seconds")
            d0, e0 = hist(before, "quilt_step_duration_seconds")
            d1, e1 = hist(after, "quilt_step_duration_seconds")
            ov = (s1 - s0) / max(1, c1 - c0)
            st = (d1 - d0) / max(1, e1 - e0)
            print(f"{n:>8} {int(c1 - c0):>6} {ov * 1e6:>11.1f} us {st * 1e6:>17.1f} us {ov / (ov + st) * 100 if st else 0:>5.1f}%")
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=30)


if __name__ == "__main__":
    main()
