#!/usr/bin/env bash
# Run the main job: sets up .venv, then `lowbit-jax demo` (extra arguments are passed on).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
exec lowbit-jax demo "$@"
