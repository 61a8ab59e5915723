#!/usr/bin/env bash
# The test command (README): installs what is missing, builds, and runs every GoogleTest suite
# through ctest (MPI suites under mpiexec). Works on a fresh Debian machine as root.
#   QUILT_BUILD_DIR   build folder (default: build)
#   QUILT_JOBS        parallel build jobs (default: nproc)
#   QUILT_GOLDEN_DIR  check the model against other fixtures made by tests/golden/make_fixtures.py
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${QUILT_BUILD_DIR:-$root/build}"
jobs="${QUILT_JOBS:-$(nproc)}"

bash "$root/launch/install-deps.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# The end-to-end tests' Python clients, from PyPI, in a venv of the build folder.
venv="$build/venv-e2e"
req="$root/tests/e2e/requirements.txt"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.txt"
fi

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQUILT_E2E_PYTHON="$venv/bin/python"
cmake --build "$build" -j "$jobs"
cd "$build"
ctest --output-on-failure --timeout 900 "$@"
