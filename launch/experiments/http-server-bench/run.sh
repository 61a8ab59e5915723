#!/bin/bash
# Runs the SSE benchmark against one server (loopback only; bounded in count and time).
# Usage: [RAMP=connections per 10 ms] run.sh kj|httplib N [THREADS]
set -u
cd "$(dirname "$0")"
B=${BUILD:-/tmp/http-bench}
mkdir -p "$B"
[ -x "$B/kj_sse_server" ] || g++ -O2 -std=c++20 kj_sse_server.cpp -o "$B/kj_sse_server" $(pkg-config --cflags --libs kj-http kj-async)
[ -x "$B/httplib_sse_server" ] || g++ -O2 -std=c++20 httplib_sse_server.cpp -o "$B/httplib_sse_server" -lcpp-httplib -lpthread
[ -x "$B/sse_client" ] || g++ -O2 -std=c++20 sse_client.cpp -o "$B/sse_client"
ulimit -n 20000
N=${2:-1000}
if [ "$1" = kj ]; then PORT=18090; "$B/kj_sse_server" $PORT 20 50 & else PORT=18091; "$B/httplib_sse_server" $PORT "${3:-8}" 20 50 & fi
SRV=$!
sleep 0.5
( peak_rss=0; peak_thr=0
  while kill -0 $SRV 2>/dev/null; do
    r=$(awk '/VmRSS/{print $2}' /proc/$SRV/status 2>/dev/null); t=$(awk '/Threads/{print $2}' /proc/$SRV/status 2>/dev/null)
    [ -n "$r" ] && [ "$r" -gt "$peak_rss" ] && peak_rss=$r; [ -n "$t" ] && [ "$t" -gt "$peak_thr" ] && peak_thr=$t
    echo "$peak_rss $peak_thr" > "$B/peak.$SRV"; sleep 0.05; done ) &
MON=$!
/usr/bin/time -f "client cpu: user=%Us sys=%Ss" "$B/sse_client" $PORT "$N" 20 30 "${RAMP:-0}"
echo "server cpu (ticks user/sys): $(awk '{print $14"/"$15}' /proc/$SRV/stat)"
kill $SRV; wait $SRV 2>/dev/null; sleep 0.1; kill $MON 2>/dev/null
echo "server peak RSS KiB / threads: $(cat "$B/peak.$SRV")"
