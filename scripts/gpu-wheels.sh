#!/usr/bin/env bash
# Prepares, here (with network), the wheels that scripts/gpu-check.sh installs on the GPU machine, whose
# Python 3.12 has torch, transformers, peft and accelerate but not bitsandbytes (docs/trainer.md "GPU
# readiness"). Everything in the folder is carried to that machine: 64 MiB at most, or this fails.
#   bash scripts/gpu-wheels.sh            # download into .gpu-wheels/, then check it
#   bash scripts/gpu-wheels.sh --check    # only check the folder (budget, tags, one version each)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DIR=${GPU_WHEELS:-.gpu-wheels}
BUDGET_MIB=64
# bitsandbytes 0.50.2: 41 MiB, kernels for CUDA 11.8 to 13.2 (the GPU machine's torch 2.11 is built for
# CUDA 13.0), needs torch, numpy and packaging (there). 0.48 and 0.49 (58 MiB) also fit; 0.50.2 leaves room.
# No deepspeed: the check runs one process on one GPU, and deepspeed ships only an sdist.
WHEELS=(bitsandbytes==0.50.2)

fail() {
  echo "gpu-wheels: FAILED: $*" >&2
  exit 1
}

download() {
  local fresh
  fresh=$(mktemp -d)
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$fresh" "${WHEELS[@]}" || fail "pip download ${WHEELS[*]}"
  # replace the folder whole: two versions of one project would stop the install there
  rm -rf "$DIR"
  mkdir -p "$DIR"
  mv "$fresh"/*.whl "$DIR"/
  rm -rf "$fresh"
}

check() {
  [[ -d $DIR ]] || fail "no folder $DIR (run: bash scripts/gpu-wheels.sh)"
  local total=0 size file name wheels=0
  local -A seen=()
  while IFS= read -r -d '' file; do
    size=$(stat -c %s "$file")
    total=$((total + size))
    printf '%10d  %s\n' "$size" "${file#"$DIR"/}"
    [[ $file == *.whl ]] || continue
    wheels=$((wheels + 1))
    name=$(basename "$file")
    [[ $name =~ -(py3|cp312)-(none|abi3|cp312)-[a-z0-9_.]*(manylinux|linux)[a-z0-9_]*x86_64[a-z0-9_.]*\.whl$ ]] ||
      fail "$name is not a Python 3.12 wheel for Linux x86_64"
    name=${name%%-*}
    [[ -z ${seen[$name]:-} ]] || fail "$DIR holds two versions of $name: keep one"
    seen[$name]=1
  done < <(find "$DIR" -type f -print0 | sort -z)
  ((wheels)) || fail "no wheel in $DIR"
  printf '%10d  in all (%d.%02d MiB of the %d MiB budget)\n' "$total" $((total / 1048576)) \
    $((total % 1048576 * 100 / 1048576)) "$BUDGET_MIB"
  ((total <= BUDGET_MIB * 1048576)) || fail "$DIR holds $total bytes, over the $BUDGET_MIB MiB that travels"
}

case "${1:-}" in
  --check) check ;;
  "") download && check ;;
  *) fail "unknown argument $1 (none, or --check)" ;;
esac
