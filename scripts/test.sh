#!/usr/bin/env bash
# Run the test suite: sets up .venv with the test extra (torch CPU + bitsandbytes 0.50.2), then pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec python -m pytest -n 2 --dist loadfile -q "$@"
