#!/usr/bin/env bash
# The README's first command: on a fresh Debian machine, installs the dependencies, builds Quilt,
# and serves configs/local-cpu.yaml (coordinator + 2 CPU workers) on the tiny random default
# model. It prints the URL and curl examples once the job is up; Ctrl-C stops it.
#   QUILT_BUILD_DIR  build folder (default: build)     QUILT_CONFIG  config (default: configs/local-cpu.yaml)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${QUILT_BUILD_DIR:-$root/build}"
bash "$root/launch/install-deps.sh"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)" --target quilt
cd "$root"
exec "$build/quilt" launch "${QUILT_CONFIG:-configs/local-cpu.yaml}"
