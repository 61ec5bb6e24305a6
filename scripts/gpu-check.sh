#!/usr/bin/env bash
# GPU readiness on a machine with one NVIDIA GPU and no network (docs/trainer.md "GPU readiness"): the
# project from its source tree on this machine's Python, the wheels that scripts/gpu-wheels.sh prepared
# installed beside it (never into it), then bench/gpu_check.py. Under 8 minutes on an H100.
#   bash scripts/gpu-check.sh [--only lora-1b,qlora-nf4] [--out DIR]    # DIR: $OUT, else out/gpu-check
# Exits 0 when every check passed, 1 when one failed, 2 without a working CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}

fail() {
  echo "gpu-check: FAILED: $*" >&2
  exit 1
}

command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH (set PYTHON=/path/to/python3)"
site=
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  site=$(mktemp -d "${TMPDIR:-/tmp}/kubetune-gpu-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  echo "gpu-check: installing ${#wheels[@]} wheel(s) from $WHEELS into $site"
  # --no-deps: the wheels' own needs (torch, numpy, packaging) are this Python's; nothing is fetched
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" ||
    fail "pip could not install the wheels in $WHEELS (made by scripts/gpu-wheels.sh)"
else
  echo "gpu-check: no wheels in $WHEELS: $PYTHON's own packages only (scripts/gpu-wheels.sh makes them)"
fi
export PYTHONPATH="${site:+$site:}$PWD/operator:$PWD/trainer_image:$PWD/testing${PYTHONPATH:+:$PYTHONPATH}"
# no network there: never let a hub look-up wait for a timeout
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
"$PYTHON" bench/gpu_check.py --out "${OUT:-out/gpu-check}" "$@" || status=$?
exit "$status"
